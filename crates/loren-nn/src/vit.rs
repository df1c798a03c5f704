//! The Vision Transformer as named parameters plus one forward pass that serves every method.
//!
//! Every backbone weight carries a leading group axis: 1 when the members share it (LoRA,
//! single) and M when each member owns a copy (explicit). Adapters and heads are always [M, ...].
//! The ops broadcast a group of 1 against M, so under LoRA everything before the first adapted
//! projection (patch and token embedding, the first LayerNorm) runs once on B·T rows, and the
//! stream turns per-member where the first adapter's output joins it. Under MC Dropout the
//! backbone is shared and trained, and the stream turns per-member in the first attention, where
//! each member draws DropKey masks of its own.

use loren_autograd::{ParamId, Params, Tape, Var, ops};
use loren_tensor::ops::dropkey::{DropKey, ItemKeys, image_keys};
use loren_tensor::ops::embed::patchify;
use loren_tensor::ops::loss::softmax;
use loren_tensor::{Device, MemTag, Rng, Staged, Tensor};

use crate::checkpoint::{Entry, TensorFile};
use crate::config::{Activations, EnsembleConfig, Method, Proj, VitConfig};
use crate::data::{DataError, Dataset, stage_images};
use crate::error::{NnError, Result};

/// `y = x·Wᵀ + b`.
///
/// The layer structs hold a [`ParamId`] per parameter in the model, and a [`Var`] per parameter
/// in a forward (see [`Block::map`]).
#[derive(Clone, Debug)]
pub struct Linear<T = ParamId> {
    pub weight: T,
    pub bias: Option<T>,
}

/// A member's low-rank pair: A [M, r, in], B [M, out, r].
#[derive(Clone, Debug)]
pub struct Adapter<T = ParamId> {
    pub a: T,
    pub b: T,
}

/// An attention projection, with adapters when LoRA targets it.
#[derive(Clone, Debug)]
pub struct Projection<T = ParamId> {
    pub linear: Linear<T>,
    pub adapter: Option<Adapter<T>>,
}

#[derive(Clone, Debug)]
pub struct Norm<T = ParamId> {
    pub gamma: T,
    pub beta: T,
}

#[derive(Clone, Debug)]
pub struct Block<T = ParamId> {
    pub norm1: Norm<T>,
    /// q, k, v, o in that order.
    pub attn: [Projection<T>; 4],
    pub norm2: Norm<T>,
    pub fc1: Linear<T>,
    pub fc2: Linear<T>,
}

impl<T> Linear<T> {
    fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> Linear<U> {
        Linear {
            weight: f(&self.weight),
            bias: self.bias.as_ref().map(f),
        }
    }
}

impl<T> Norm<T> {
    fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> Norm<U> {
        Norm {
            gamma: f(&self.gamma),
            beta: f(&self.beta),
        }
    }
}

impl<T> Projection<T> {
    fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> Projection<U> {
        Projection {
            linear: self.linear.map(f),
            adapter: self.adapter.as_ref().map(|ad| Adapter {
                a: f(&ad.a),
                b: f(&ad.b),
            }),
        }
    }
}

impl<T> Block<T> {
    /// The same block with each parameter replaced by `f` of it, called in a fixed order: that
    /// of [`Block::values`].
    pub fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> Block<U> {
        // Struct fields are evaluated in the order written, which fixes the order of the calls.
        Block {
            norm1: self.norm1.map(f),
            attn: [0, 1, 2, 3].map(|i| self.attn[i].map(f)),
            norm2: self.norm2.map(f),
            fc1: self.fc1.map(f),
            fc2: self.fc2.map(f),
        }
    }

    /// `values`, one per parameter in the order of [`Block::values`], in this block's layout.
    pub fn with_values<U: Clone>(&self, values: &[U]) -> loren_tensor::Result<Block<U>> {
        let n = self.values().len();
        if values.len() != n {
            return Err(loren_tensor::Error::invalid(
                "block",
                format!("{n} parameters, got {} values", values.len()),
            ));
        }
        let mut it = values.iter().cloned();
        Ok(self.map(&mut |_| it.next().expect("as many values as parameters")))
    }

    /// Every parameter of the block, in the order [`Block::map`] visits them.
    pub fn values(&self) -> Vec<&T> {
        let mut out = Vec::new();
        self.map(&mut |t| out.push(t));
        out
    }
}

/// What a block's forward reads besides its input and parameters.
#[derive(Clone, Debug)]
struct BlockShape {
    heads: usize,
    ln_eps: f32,
    lora_scale: f32,
    /// MC Dropout's masks for this block's attention.
    drop: Option<DropKey>,
}

/// Which DropKey masks an MC Dropout forward draws (other methods draw none): a training step's,
/// fresh every step, or the one fixed draw every prediction uses, so that scoring a model twice
/// gives the same figures. A member's masks differ from every other member's in both. A
/// prediction's batch rows draw the masks of the items its keys name: keyed by each image's
/// content ([`Vit::image_keys`]), an image draws the same masks in any batch and at any place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draw {
    seed: u64,
    items: Option<ItemKeys>,
}

impl Draw {
    /// The draw of training step `step` of a run seeded `seed`: row b draws item b's masks.
    pub fn step(seed: u64, step: u64) -> Draw {
        const STEP: u64 = 0x5354_4550_0000_0000;
        Draw {
            seed: Rng::new(seed).fork(STEP).fork(step).next_u64(),
            items: None,
        }
    }

    /// The prediction's draw of a model trained by a run seeded `seed`, row b drawing the masks
    /// of item `items[b]` (of item b without keys): fixed for the model, and another for each
    /// seed, so that a spread over seeds holds the masks' share too.
    pub fn prediction(seed: u64, items: Option<ItemKeys>) -> Draw {
        const PREDICTION: u64 = 0x5052_4544_4943_5400;
        // Seed 0's is the one draw every model predicted with before the draw followed the
        // seed: its figures (the README's, earlier runs') stay as they were.
        let seed = match seed {
            0 => PREDICTION,
            s => Rng::new(s).fork(PREDICTION).next_u64(),
        };
        Draw { seed, items }
    }

    /// Block `block`'s masks at `rate` for `members` members.
    fn block(&self, block: usize, rate: f32, members: usize) -> loren_tensor::Result<DropKey> {
        let seed = Rng::new(self.seed).fork(block as u64).next_u64();
        let dk = DropKey::new(rate, seed, members)?;
        Ok(match &self.items {
            Some(items) => dk.with_items(items.clone()),
            None => dk,
        })
    }
}

/// A ViT with its parameters, laid out for one method and member count.
pub struct Vit {
    pub config: VitConfig,
    pub ensemble: EnsembleConfig,
    params: Params,
    patch_embed: Linear,
    cls: ParamId,
    pos: ParamId,
    blocks: Vec<Block>,
    norm: Norm,
    head: Linear,
    /// Where [`Vit::load_backbone`] loaded the backbone from, if it did.
    backbone: Option<BackboneSource>,
    /// The seed of the run that trained it, which MC Dropout's prediction masks follow
    /// ([`Draw::prediction`]).
    prediction_seed: u64,
}

/// A backbone file a model was loaded from: what a training checkpoint records of it, so that
/// eval and export find it and refuse other weights.
#[derive(Clone, Debug)]
pub struct BackboneSource {
    /// Absolute where it could be made so, to be found from any directory.
    pub path: std::path::PathBuf,
    /// Its [`TensorFile::fingerprint`].
    pub fingerprint: String,
}

/// Adds parameters in a fixed order from one seeded stream, so a model is reproducible.
struct Builder<'a> {
    params: &'a mut Params,
    rng: Rng,
    dev: Device,
    /// The backbone's group count: 1 shared, or M per member.
    groups: usize,
    members: usize,
    train_backbone: bool,
}

impl Builder<'_> {
    fn add(&mut self, name: String, t: Tensor, trainable: bool, decay: bool) -> Result<ParamId> {
        Ok(self.params.add(name, t, trainable, decay)?)
    }

    /// A weight matrix the GEMMs read: bf16 on a GPU.
    fn add_matrix(&mut self, name: String, t: Tensor, trainable: bool) -> Result<ParamId> {
        Ok(self.params.add_gemm_weight(name, t, trainable, true)?)
    }

    fn normal(&mut self, shape: Vec<usize>, std: f32) -> Result<Tensor> {
        Ok(Tensor::randn(
            shape,
            std,
            &mut self.rng,
            MemTag::Trainable,
            &self.dev,
        )?)
    }

    fn full(&self, shape: Vec<usize>, v: f32) -> Result<Tensor> {
        Ok(Tensor::full(v, shape, MemTag::Trainable, &self.dev)?)
    }

    /// A backbone linear layer, normal(0.02) weights and zero bias, as timm starts a ViT.
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let (g, train) = (self.groups, self.train_backbone);
        let w = self.normal(vec![g, out, inp], 0.02)?;
        let weight = self.add_matrix(format!("{name}.weight"), w, train)?;
        let bias = if bias {
            let b = self.full(vec![g, out], 0.0)?;
            Some(self.add(format!("{name}.bias"), b, train, false)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn norm(&mut self, name: &str, d: usize) -> Result<Norm> {
        let (g, train) = (self.groups, self.train_backbone);
        let gamma = self.full(vec![g, d], 1.0)?;
        let gamma = self.add(format!("{name}.weight"), gamma, train, false)?;
        let beta = self.full(vec![g, d], 0.0)?;
        let beta = self.add(format!("{name}.bias"), beta, train, false)?;
        Ok(Norm { gamma, beta })
    }

    /// A: Xavier-uniform with a gain, different for every member; B: zero, so every member
    /// starts as the pretrained network.
    fn adapter(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        rank: usize,
        gain: f32,
    ) -> Result<Adapter> {
        let m = self.members;
        let bound = gain * (6.0 / (inp + rank) as f32).sqrt();
        let a = Tensor::uniform(
            vec![m, rank, inp],
            -bound,
            bound,
            &mut self.rng,
            MemTag::Trainable,
            &self.dev,
        )?;
        let a = self.add(format!("{name}.lora_a"), a, true, true)?;
        let b = self.full(vec![m, out, rank], 0.0)?;
        let b = self.add(format!("{name}.lora_b"), b, true, true)?;
        Ok(Adapter { a, b })
    }

    /// One head per member, each started as PyTorch starts a Linear: U(±1/√in).
    fn head(&mut self, classes: usize, d: usize) -> Result<Linear> {
        let m = self.members;
        let bound = 1.0 / (d as f32).sqrt();
        let w = Tensor::uniform(
            vec![m, classes, d],
            -bound,
            bound,
            &mut self.rng,
            MemTag::Trainable,
            &self.dev,
        )?;
        let weight = self.add_matrix("head.weight".into(), w, true)?;
        let b = Tensor::uniform(
            vec![m, classes],
            -bound,
            bound,
            &mut self.rng,
            MemTag::Trainable,
            &self.dev,
        )?;
        let bias = Some(self.add("head.bias".into(), b, true, false)?);
        Ok(Linear { weight, bias })
    }
}

/// The seed a model to fine-tune is started with, for a run's seed: a stream of its own. A model
/// started from the seed itself at the backbone's size draws the very head the backbone was
/// pretrained with when the seeds agree (the bundled backbone's is 0, the default), so a single
/// network would start fitted to the backbone's features.
pub fn fine_tune_seed(seed: u64) -> u64 {
    const FINE_TUNE: u64 = 0x4649_4E45_5455_4E45;
    Rng::new(seed).fork(FINE_TUNE).next_u64()
}

impl Vit {
    /// A freshly started model: a random backbone (replace it with [`Vit::load_backbone`] to
    /// fine-tune, starting from [`fine_tune_seed`]), random adapters and heads.
    pub fn new(
        config: &VitConfig,
        ensemble: &EnsembleConfig,
        device: &Device,
        seed: u64,
    ) -> Result<Vit> {
        ensemble.validate(config)?;
        let (d, m) = (config.dim, ensemble.members);
        let explicit = ensemble.method == Method::Explicit;
        let mut params = Params::new(device);
        let mut bld = Builder {
            params: &mut params,
            rng: Rng::new(seed),
            dev: device.clone(),
            groups: if explicit { m } else { 1 },
            members: m,
            train_backbone: ensemble.method.trains_backbone(),
        };
        let patch_embed = bld.linear("patch_embed", d, config.patch_features(), true)?;
        let g = bld.groups;
        let cls = bld.normal(vec![g, d], 0.02)?;
        let train = bld.train_backbone;
        let cls = bld.add("cls_token".into(), cls, train, false)?;
        let pos = bld.normal(vec![g, config.tokens(), d], 0.02)?;
        let pos = bld.add("pos_embed".into(), pos, train, false)?;
        let mut blocks = Vec::with_capacity(config.depth);
        for i in 0..config.depth {
            let p = format!("blocks.{i}");
            let norm1 = bld.norm(&format!("{p}.norm1"), d)?;
            let attn = Proj::ALL.map(|proj| -> Result<Projection> {
                let name = format!("{p}.attn.{}", proj.name());
                let linear = bld.linear(&name, d, d, true)?;
                let lora = &ensemble.lora;
                let adapter = (ensemble.method.uses_lora() && lora.targets.contains(proj))
                    .then(|| bld.adapter(&name, d, d, lora.rank, lora.init_gain))
                    .transpose()?;
                Ok(Projection { linear, adapter })
            });
            let [q, k, v, o] = attn;
            let attn = [q?, k?, v?, o?];
            let norm2 = bld.norm(&format!("{p}.norm2"), d)?;
            let fc1 = bld.linear(&format!("{p}.mlp.fc1"), config.mlp_dim, d, true)?;
            let fc2 = bld.linear(&format!("{p}.mlp.fc2"), d, config.mlp_dim, true)?;
            blocks.push(Block {
                norm1,
                attn,
                norm2,
                fc1,
                fc2,
            });
        }
        let norm = bld.norm("norm", d)?;
        let head = bld.head(ensemble.classes, d)?;
        Ok(Vit {
            config: config.clone(),
            ensemble: ensemble.clone(),
            params,
            patch_embed,
            cls,
            pos,
            blocks,
            norm,
            head,
            backbone: None,
            prediction_seed: 0,
        })
    }

    /// Predict as a model trained by a run seeded `seed` (its [`TrainConfig::seed`]): MC
    /// Dropout's prediction masks follow it. A [`Trainer`] sets it, and a trained model's
    /// loader from what its file records; a model of neither draws seed 0's.
    ///
    /// [`TrainConfig::seed`]: crate::train::TrainConfig::seed
    /// [`Trainer`]: crate::train::Trainer
    pub fn set_prediction_seed(&mut self, seed: u64) {
        self.prediction_seed = seed;
    }

    /// Where the backbone was loaded from, by [`Vit::load_backbone`].
    pub fn backbone_source(&self) -> Option<&BackboneSource> {
        self.backbone.as_ref()
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// Whether a forward draws DropKey masks (MC Dropout), so that a prediction reads its
    /// images' keys.
    pub fn draws_masks(&self) -> bool {
        self.ensemble.method.drops_keys()
    }

    /// The keys [`Vit::predict`] reads for images [B, C, H, W] on the host: each image's
    /// [`image_key`](loren_tensor::ops::dropkey::image_key), or none where the model draws no
    /// masks.
    pub fn image_keys(&self, images: &[f32]) -> Vec<u64> {
        let c = &self.config;
        self.keys_of(images, c.channels * c.image_size * c.image_size)
    }

    fn keys_of(&self, images: &[f32], per_image: usize) -> Vec<u64> {
        match self.draws_masks() {
            true => image_keys(images, per_image),
            false => Vec::new(),
        }
    }

    /// Images `shape` = [B, C, H, W] on the host, staged for this model's device
    /// ([`Tensor::from_staged`] takes them up), with the keys [`Vit::predict`] reads for them:
    /// what a prediction's background thread makes of each batch.
    pub fn stage_for_prediction(
        &self,
        images: &[f32],
        shape: [usize; 4],
    ) -> Result<(Staged, Vec<u64>)> {
        let staged = stage_images(images, shape, self.device())?;
        Ok((staged, self.keys_of(images, shape[1..].iter().product())))
    }

    pub fn members(&self) -> usize {
        self.ensemble.members
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Whether a parameter belongs to the backbone (everything but adapters and heads).
    pub fn is_backbone(name: &str) -> bool {
        !(name.starts_with("head.") || name.ends_with(".lora_a") || name.ends_with(".lora_b"))
    }

    /// The parameters `keep` selects, as (name, shape, values) for a checkpoint.
    pub fn tensors(&self, keep: impl Fn(&str, bool) -> bool) -> Result<Vec<(String, Entry)>> {
        self.params
            .iter()
            .filter(|(_, p)| keep(p.name(), p.trainable()))
            .map(|(_, p)| {
                let entry = Entry {
                    shape: p.value().dims().to_vec(),
                    data: p.value().to_vec()?,
                };
                Ok((p.name().to_string(), entry))
            })
            .collect()
    }

    /// The shared backbone without its group axis, as a pretrained checkpoint holds it.
    pub fn backbone_tensors(&self) -> Result<Vec<(String, Entry)>> {
        if self.ensemble.method == Method::Explicit {
            return Err(NnError::Config(
                "an explicit ensemble has one backbone per member, not a shared one".into(),
            ));
        }
        let mut t = self.tensors(|name, _| Vit::is_backbone(name))?;
        for (_, e) in &mut t {
            e.shape.remove(0);
        }
        Ok(t)
    }

    /// Replace the backbone with a pretrained one: tensors without the group axis, copied to
    /// every group. A missing or misshapen tensor is an error naming it. The model keeps the
    /// file's path and fingerprint ([`Vit::backbone_source`]), which a training checkpoint
    /// records.
    pub fn load_backbone(&mut self, file: &TensorFile) -> Result<()> {
        self.load_shared_weights(file)?;
        let path = file.path();
        self.backbone = Some(BackboneSource {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            fingerprint: file.fingerprint(),
        });
        Ok(())
    }

    /// The backbone's tensors from `file`, as [`Vit::load_backbone`] loads them, without taking
    /// `file` for the model's backbone: an exported ensemble's shared weights, say, whose
    /// fingerprint would mean nothing (and cost a pass over the file).
    pub fn load_shared_weights(&mut self, file: &TensorFile) -> Result<()> {
        for (id, name, dims) in self.select(|name, _| Vit::is_backbone(name)) {
            let one = file.get_shaped(&name, &dims[1..])?;
            let tiled = one.repeat(dims[0]);
            self.params.set(id, &tiled)?;
        }
        Ok(())
    }

    /// Load the parameters `keep` selects from a checkpoint written by [`Vit::tensors`].
    pub fn load_tensors(
        &mut self,
        file: &TensorFile,
        keep: impl Fn(&str, bool) -> bool,
    ) -> Result<()> {
        for (id, name, dims) in self.select(keep) {
            let values = file.get_shaped(&name, &dims)?;
            self.params.set(id, values)?;
        }
        Ok(())
    }

    /// The id, name and shape of each parameter `keep` selects (by name and trainability).
    fn select(&self, keep: impl Fn(&str, bool) -> bool) -> Vec<(ParamId, String, Vec<usize>)> {
        self.params
            .iter()
            .filter(|(_, p)| keep(p.name(), p.trainable()))
            .map(|(id, p)| (id, p.name().to_string(), p.value().dims().to_vec()))
            .collect()
    }

    /// Whether `data` is what this model trains on or is scored against, before any batch of it
    /// is made: [`Vit::check_data_images`], and the model's classes. Training and serving check
    /// alike.
    pub fn check_data(&self, data: &Dataset) -> Result<(), DataError> {
        self.check_data_images(data)?;
        if data.classes != self.ensemble.classes {
            return Err(DataError::ModelClasses {
                name: data.name.clone(),
                model: self.config.name.clone(),
                expected: self.ensemble.classes,
                found: data.classes,
            });
        }
        Ok(())
    }

    /// Whether this model can predict on `data`'s images: the data's own invariants (its fields
    /// are public), then the model's channels and image size (as [`Dataset::batch`] makes them).
    /// Its classes may be others: an out-of-distribution set is scored for detection alone.
    pub fn check_data_images(&self, data: &Dataset) -> Result<(), DataError> {
        data.validate()?;
        let (c, name) = (&self.config, || data.name.clone());
        let model = || c.name.clone();
        let [channels, h, w] = data.batch_shape();
        if channels != c.channels {
            return Err(DataError::ModelChannels {
                name: name(),
                model: model(),
                expected: c.channels,
                found: channels,
            });
        }
        if [h, w] != [c.image_size; 2] {
            return Err(DataError::ModelImageSize {
                name: name(),
                model: model(),
                expected: [c.image_size; 2],
                found: [h, w],
            });
        }
        Ok(())
    }

    /// Check that `images` is a batch this model takes: [B, C, H, W].
    fn check_images(&self, images: &Tensor) -> Result<()> {
        let c = &self.config;
        let d = images.dims();
        if d.len() != 4
            || d[1] != c.channels
            || d[2] != c.image_size
            || d[3] != c.image_size
            || d[0] == 0
        {
            return Err(NnError::Config(format!(
                "model '{}' takes images [B, {}, {}, {}], got {}",
                c.name,
                c.channels,
                c.image_size,
                c.image_size,
                images.shape()
            )));
        }
        Ok(())
    }

    /// The members' logits [M, B, classes] for images [B, C, H, W]. On a recording tape,
    /// `activations` says what the blocks keep for the backward; `draw` picks MC Dropout's masks.
    pub fn forward(
        &self,
        tape: &Tape,
        images: &Tensor,
        activations: Activations,
        draw: Draw,
    ) -> Result<Var> {
        self.check_images(images)?;
        let mut param = |id: &ParamId| tape.param(&self.params, *id);
        let patches = Var::constant(patchify(images, self.config.patch)?);
        let pe = linear(tape, &patches, &self.patch_embed.map(&mut param), None)?;
        let mut x = ops::embed_tokens(tape, &pe, &param(&self.cls), &param(&self.pos))?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let drop = self
                .draws_masks()
                .then(|| draw.block(i, self.ensemble.drop_key, self.members()))
                .transpose()?;
            let shape = BlockShape {
                heads: self.config.heads,
                ln_eps: self.config.ln_eps,
                lora_scale: self.ensemble.lora.scale,
                drop,
            };
            let p = blk.map(&mut param);
            x = match activations {
                Activations::Keep => block_forward(tape, &x, &p, &shape)?,
                Activations::Recompute => {
                    let template = blk.clone();
                    let inputs: Vec<Var> = std::iter::once(x)
                        .chain(p.values().into_iter().cloned())
                        .collect();
                    ops::recompute(tape, &inputs, move |tape, vars| {
                        let p = template.with_values(&vars[1..])?;
                        block_forward(tape, &vars[0], &p, &shape)
                    })?
                }
            };
        }
        let c = ops::class_token(tape, &x)?;
        let c = layernorm(tape, &c, &self.norm.map(&mut param), self.config.ln_eps)?;
        let head = self.head.map(&mut param);
        Ok(ops::logits(tape, &c, &head.weight, head.bias.as_ref())?)
    }

    /// Every member's class probabilities [M, B, classes], without recording anything. `keys`
    /// names each image for MC Dropout's masks: [`Vit::image_keys`] of the images' values, so
    /// that an image draws the same masks in any batch and at any place. Only a model that
    /// [draws masks](Vit::draws_masks) reads them; for the others `&[]` will do.
    pub fn predict(&self, images: &Tensor, keys: &[u64]) -> Result<Tensor> {
        self.check_images(images)?;
        let items = self.items(images.dims()[0], keys)?;
        let draw = Draw::prediction(self.prediction_seed, items);
        let logits = self.forward(&Tape::inference(), images, Activations::Keep, draw)?;
        Ok(softmax(logits.value())?)
    }

    /// A prediction's item keys for `batch` images, on this model's device; none where it draws
    /// no masks.
    fn items(&self, batch: usize, keys: &[u64]) -> Result<Option<ItemKeys>> {
        if !self.draws_masks() {
            return Ok(None);
        }
        if keys.len() != batch {
            return Err(NnError::Config(format!(
                "MC Dropout draws its masks by image: {} keys for {batch} images",
                keys.len()
            )));
        }
        Ok(Some(ItemKeys::new(keys.to_vec(), self.device())?))
    }
}

/// One encoder block: pre-norm attention and MLP, each added to the residual stream.
fn block_forward(
    tape: &Tape,
    x: &Var,
    p: &Block<Var>,
    s: &BlockShape,
) -> loren_tensor::Result<Var> {
    let h = layernorm(tape, x, &p.norm1, s.ln_eps)?;
    let [q, k, v] = [0, 1, 2].map(|i| project(tape, &h, &p.attn[i], s.lora_scale, None));
    let a = ops::attention(tape, &q?, &k?, &v?, s.heads, s.drop.clone())?;
    let x = project(tape, &a, &p.attn[3], s.lora_scale, Some(x))?;
    let h = layernorm(tape, &x, &p.norm2, s.ln_eps)?;
    let h = ops::linear(tape, &h, &p.fc1.weight, None, None)?;
    let b = p.fc1.bias.as_ref().ok_or_else(|| {
        loren_tensor::Error::invalid("block", "fc1 has no bias for the fused bias+GELU")
    })?;
    let h = ops::bias_gelu(tape, &h, b)?;
    linear(tape, &h, &p.fc2, Some(&x))
}

/// The layer, added to `residual` when given (in its product: see [`ops::linear`]).
fn linear(
    tape: &Tape,
    x: &Var,
    l: &Linear<Var>,
    residual: Option<&Var>,
) -> loren_tensor::Result<Var> {
    ops::linear(tape, x, &l.weight, l.bias.as_ref(), residual)
}

fn layernorm(tape: &Tape, x: &Var, n: &Norm<Var>, eps: f32) -> loren_tensor::Result<Var> {
    ops::layernorm(tape, x, &n.gamma, &n.beta, eps)
}

/// An attention projection, added to `residual` when given, in its product.
fn project(
    tape: &Tape,
    x: &Var,
    p: &Projection<Var>,
    scale: f32,
    residual: Option<&Var>,
) -> loren_tensor::Result<Var> {
    match &p.adapter {
        None => linear(tape, x, &p.linear, residual),
        Some(ad) => ops::lora_linear(
            tape,
            x,
            &p.linear.weight,
            p.linear.bias.as_ref(),
            &ad.a,
            &ad.b,
            scale,
            residual,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoraConfig;

    /// An ensemble of 3 members (of rank 4, with gain `gain`, where LoRA) on the tiny config.
    fn ensemble(method: Method, gain: f32) -> Vit {
        let ensemble = EnsembleConfig {
            drop_key: EnsembleConfig::DROP_KEY,
            method,
            members: 3,
            classes: 10,
            lora: LoraConfig {
                rank: 4,
                init_gain: gain,
                ..LoraConfig::default()
            },
        };
        Vit::new(&VitConfig::tiny(), &ensemble, &Device::cpu(), 5).unwrap()
    }

    fn lora(gain: f32) -> Vit {
        ensemble(Method::Lora, gain)
    }

    /// Two random images on `model`'s device.
    fn images(model: &Vit) -> (Tensor, Vec<f32>) {
        let mut rng = Rng::new(2);
        let images: Vec<f32> = (0..2 * 64).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let shape = vec![2, 1, 8, 8];
        let x = Tensor::from_vec(images.clone(), shape, MemTag::Workspace, model.device());
        (x.unwrap(), images)
    }

    /// MC Dropout trains a different sub-network at every step, and each block draws masks of
    /// its own: one draw for all would be a fixed sub-network, not dropout.
    #[test]
    fn every_step_and_every_block_draws_masks_of_its_own() {
        let model = ensemble(Method::McDropout, 1.0);
        let (x, _) = images(&model);
        let logits = |draw: Draw| {
            let tape = Tape::inference();
            let out = model.forward(&tape, &x, Activations::Keep, draw).unwrap();
            out.value().to_vec().unwrap()
        };
        assert_ne!(logits(Draw::step(0, 0)), logits(Draw::step(0, 1)));
        assert_ne!(logits(Draw::step(0, 4)), logits(Draw::step(1, 4)));
        assert_eq!(logits(Draw::step(3, 9)), logits(Draw::step(3, 9)));
        let draw = Draw::step(0, 0);
        let block = |b| draw.block(b, EnsembleConfig::DROP_KEY, 3).unwrap();
        assert_ne!(block(0), block(1));
        assert_eq!(block(2), block(2));
    }

    /// A prediction draws one fixed set of masks for a model, and another for a model of
    /// another run's seed: a spread over seeds then holds the masks' share too.
    #[test]
    fn prediction_masks_are_fixed_per_seed_and_apart_across_seeds() {
        let mut model = ensemble(Method::McDropout, 1.0);
        let (x, host) = images(&model);
        let keys = model.image_keys(&host);
        let mut predicted = |seed| {
            model.set_prediction_seed(seed);
            model.predict(&x, &keys).unwrap().to_vec().unwrap()
        };
        let (zero, one) = (predicted(0), predicted(1));
        assert_ne!(zero, one);
        assert_eq!(predicted(1), one);
        assert_ne!(predicted(2), one);
        // Seed 0's are the draw every model made before it followed the seed.
        let old = Draw {
            seed: 0x5052_4544_4943_5400,
            items: model.items(2, &keys).unwrap(),
        };
        let logits = model.forward(&Tape::inference(), &x, Activations::Keep, old);
        let old = softmax(logits.unwrap().value()).unwrap().to_vec().unwrap();
        assert_eq!(zero, old);
    }

    /// B starts at zero, A Xavier-uniform with the gain and apart across members: the method's
    /// start.
    #[test]
    fn adapters_start_with_b_zero_and_a_xavier_uniform_apart_per_member() {
        let gain = 10.0;
        let model = lora(gain);
        let (d, r) = (model.config.dim, 4);
        let mut seen = (0, 0);
        for (_, p) in model.params().iter() {
            let v = p.value().to_vec().unwrap();
            if p.name().ends_with(".lora_b") {
                assert!(v.iter().all(|&x| x == 0.0), "{} is not zero", p.name());
                seen.1 += 1;
            }
            if p.name().ends_with(".lora_a") {
                // fan_in d, fan_out r; 3·4·64 draws come within 2% of the bound.
                let bound = gain * (6.0 / (d + r) as f32).sqrt();
                let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert!(max <= bound && max > 0.98 * bound, "{}: {max}", p.name());
                let per = v.len() / 3;
                assert_ne!(v[..per], v[per..2 * per], "{}", p.name());
                assert_ne!(v[per..2 * per], v[2 * per..], "{}", p.name());
                seen.0 += 1;
            }
        }
        let adapted = model.config.depth * 4;
        assert_eq!(seen, (adapted, adapted), "every q, k, v and o adapted");
    }

    /// With B at zero, A moves nothing: every member starts as the network without adapters.
    #[test]
    fn a_fresh_lora_ensemble_predicts_as_its_backbone() {
        let model = lora(10.0);
        let mut plain = lora(10.0);
        let ids: Vec<ParamId> = plain
            .params()
            .iter()
            .filter(|(_, p)| p.name().ends_with(".lora_a"))
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            let zeros = vec![0.0; plain.params().get(id).numel()];
            plain.params_mut().set(id, &zeros).unwrap();
        }
        let probs = |model: &Vit| {
            let (x, images) = images(model);
            let keys = model.image_keys(&images);
            model.predict(&x, &keys).unwrap().to_vec().unwrap()
        };
        assert_eq!(probs(&model), probs(&plain));
    }
}
