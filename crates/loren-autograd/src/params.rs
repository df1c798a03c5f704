use std::sync::Arc;

use loren_tensor::ops::elementwise::{add_assign, sum_squares};
use loren_tensor::{DType, Device, Error, MemTag, Result, Tensor};

/// A parameter's index in its [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamId(pub usize);

/// A named weight: frozen (shared, never updated) or trainable.
///
/// On a GPU a GEMM weight is stored in bf16: a frozen one only so, a trainable one as an f32
/// master that the optimizer updates plus a bf16 shadow it refreshes, which the ops read.
/// Everything else (adapters, norms, biases, embeddings) is f32 everywhere.
pub struct Param {
    name: String,
    value: Arc<Tensor>,
    shadow: Option<Arc<Tensor>>,
    trainable: bool,
    decay: bool,
}

impl Param {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }

    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// Whether AdamW's weight decay applies (weight matrices, not biases, norms or embeddings).
    pub fn decay(&self) -> bool {
        self.decay
    }

    /// What the ops read: the bf16 shadow of a trainable GEMM weight on a GPU, else the value.
    pub(crate) fn operand(&self) -> Arc<Tensor> {
        Arc::clone(self.shadow.as_ref().unwrap_or(&self.value))
    }
}

/// All the weights of a model, in a fixed order.
pub struct Params {
    device: Device,
    list: Vec<Param>,
}

impl Params {
    pub fn new(device: &Device) -> Params {
        Params {
            device: device.clone(),
            list: Vec::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Add a weight that GEMMs read (bf16 on a GPU; see [`Param`]).
    pub fn add_gemm_weight(
        &mut self,
        name: impl Into<String>,
        value: Tensor,
        trainable: bool,
        decay: bool,
    ) -> Result<ParamId> {
        let bf16 = !self.device.is_cpu();
        let (value, shadow) = match (bf16, trainable) {
            (false, _) => (value, None),
            (true, false) => (value.copy_as(DType::BF16, MemTag::FrozenWeights)?, None),
            (true, true) => {
                let shadow = value.copy_as(DType::BF16, MemTag::Trainable)?;
                (value, Some(Arc::new(shadow)))
            }
        };
        self.insert(name.into(), value, shadow, trainable, decay)
    }

    /// Add a weight kept in f32 on every device. Its memory is re-tagged as frozen or trainable.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        value: Tensor,
        trainable: bool,
        decay: bool,
    ) -> Result<ParamId> {
        self.insert(name.into(), value, None, trainable, decay)
    }

    fn insert(
        &mut self,
        name: String,
        mut value: Tensor,
        shadow: Option<Arc<Tensor>>,
        trainable: bool,
        decay: bool,
    ) -> Result<ParamId> {
        if self.id(&name).is_some() {
            return Err(Error::invalid(
                "params",
                format!("duplicate parameter '{name}'"),
            ));
        }
        if !value.device().same(&self.device) {
            return Err(Error::DeviceMismatch {
                op: "params",
                lhs: self.device.to_string(),
                rhs: value.device().to_string(),
            });
        }
        value.set_tag(if trainable {
            MemTag::Trainable
        } else {
            MemTag::FrozenWeights
        });
        self.list.push(Param {
            name,
            value: Arc::new(value),
            shadow,
            trainable,
            decay,
        });
        Ok(ParamId(self.list.len() - 1))
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn param(&self, id: ParamId) -> &Param {
        &self.list[id.0]
    }

    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.list[id.0].value
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.list.iter().position(|p| p.name == name).map(ParamId)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.list.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }

    pub fn trainable_ids(&self) -> Vec<ParamId> {
        self.iter()
            .filter(|(_, p)| p.trainable)
            .map(|(id, _)| id)
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.list
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.value.numel())
            .sum()
    }

    /// Number of scalars in all weights.
    pub fn num_total(&self) -> usize {
        self.list.iter().map(|p| p.value.numel()).sum()
    }

    /// Every trainable weight, mutably, for the optimizer: its f32 value, its bf16 shadow on a
    /// GPU, and whether weight decay applies. Fails while a tape still holds any of them.
    pub fn trainable_mut(&mut self) -> Result<Vec<TrainableMut<'_>>> {
        self.list
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.trainable)
            .map(|(i, p)| {
                let held = || {
                    Error::invalid(
                        "params",
                        format!(
                            "'{}' is still held by a tape; drop it before updating",
                            p.name
                        ),
                    )
                };
                let decay = p.decay;
                let shadow = match &mut p.shadow {
                    Some(s) => Some(Arc::get_mut(s).ok_or_else(held)?),
                    None => None,
                };
                let value = Arc::get_mut(&mut p.value).ok_or_else(held)?;
                Ok(TrainableMut {
                    id: ParamId(i),
                    value,
                    shadow,
                    decay,
                })
            })
            .collect()
    }

    /// Replace a weight's values with `data`, which must have its shape (and refresh its
    /// shadow).
    pub fn set(&mut self, id: ParamId, data: &[f32]) -> Result<()> {
        let p = &mut self.list[id.0];
        let held = || {
            Error::invalid(
                "params",
                format!(
                    "'{}' is still held by a tape; drop it before updating",
                    p.name
                ),
            )
        };
        Arc::get_mut(&mut p.value)
            .ok_or_else(held)?
            .copy_from_host(data)?;
        if let Some(s) = &mut p.shadow {
            Arc::get_mut(s).ok_or_else(held)?.copy_from_host(data)?;
        }
        Ok(())
    }
}

/// One trainable weight as the optimizer updates it.
pub struct TrainableMut<'a> {
    pub id: ParamId,
    pub value: &'a mut Tensor,
    /// The bf16 copy the ops read, on a GPU; the optimizer rewrites it from `value`.
    pub shadow: Option<&'a mut Tensor>,
    pub decay: bool,
}

/// Gradient buffers for the trainable parameters, kept across steps and accumulated into.
pub struct Grads {
    list: Vec<Option<Tensor>>,
}

impl Grads {
    /// Zeroed buffers for every trainable parameter; frozen ones get none.
    pub fn new(params: &Params) -> Result<Grads> {
        let list = params
            .iter()
            .map(|(_, p)| {
                p.trainable
                    .then(|| {
                        Tensor::zeros(p.value.shape().clone(), MemTag::Gradients, p.value.device())
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Grads { list })
    }

    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.list.get(id.0).and_then(|g| g.as_ref())
    }

    pub fn get_mut(&mut self, id: ParamId) -> Option<&mut Tensor> {
        self.list.get_mut(id.0).and_then(|g| g.as_mut())
    }

    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Tensor)> {
        self.list
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().map(|g| (ParamId(i), g)))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ParamId, &mut Tensor)> {
        self.list
            .iter_mut()
            .enumerate()
            .filter_map(|(i, g)| g.as_mut().map(|g| (ParamId(i), g)))
    }

    pub fn accumulate(&mut self, id: ParamId, g: &Tensor) -> Result<()> {
        match self.list.get_mut(id.0).and_then(|s| s.as_mut()) {
            Some(acc) => add_assign(acc, g),
            None => Err(Error::invalid(
                "grads",
                format!("parameter #{} has no gradient buffer (frozen?)", id.0),
            )),
        }
    }

    pub fn zero(&mut self) -> Result<()> {
        for (_, g) in self.iter_mut() {
            g.fill(0.0)?;
        }
        Ok(())
    }

    /// The L2 norm over all gradients.
    pub fn global_norm(&self) -> Result<f64> {
        let mut s = 0.0;
        for (_, g) in self.iter() {
            s += sum_squares(g)?;
        }
        Ok(s.sqrt())
    }
}
