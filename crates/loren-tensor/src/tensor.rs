use std::fmt;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::rng::Rng;
use crate::shape::Shape;

enum Storage {
    Cpu(Vec<f32>),
}

/// A contiguous, row-major tensor that owns its memory and accounts for it on its device under
/// its [`MemTag`] for as long as it lives.
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    tag: MemTag,
    storage: Storage,
    device: Device,
}

impl Tensor {
    /// Adopt `data` as a tensor of `shape` on `device`.
    pub fn from_vec(
        data: Vec<f32>,
        shape: impl Into<Shape>,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::invalid(
                "from_vec",
                format!(
                    "{} values do not fill shape {shape} ({} elements)",
                    data.len(),
                    shape.numel()
                ),
            ));
        }
        if !device.is_cpu() {
            return Err(Error::Unsupported {
                op: "from_vec",
                device: device.to_string(),
            });
        }
        let bytes = (data.len() * DType::F32.size_in_bytes()) as u64;
        device.memory().alloc(tag, bytes);
        Ok(Tensor {
            shape,
            dtype: DType::F32,
            tag,
            storage: Storage::Cpu(data),
            device: device.clone(),
        })
    }

    /// A tensor whose contents are unspecified (stale values from reused memory, never
    /// uninitialised): for outputs the op writes in full, so nothing is spent zeroing them.
    pub fn empty(shape: impl Into<Shape>, tag: MemTag, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let mut data = device.host_buffer(shape.numel());
        if cfg!(debug_assertions) {
            // Poisoned in test builds, so an element an op forgets to write shows as NaN.
            data.fill(f32::NAN);
        }
        Tensor::from_vec(data, shape, tag, device)
    }

    pub fn zeros(shape: impl Into<Shape>, tag: MemTag, device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, tag, device)
    }

    pub fn full(
        value: f32,
        shape: impl Into<Shape>,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let mut data = device.host_buffer(shape.numel());
        data.fill(value);
        Tensor::from_vec(data, shape, tag, device)
    }

    /// Normal with mean 0 and standard deviation `std`.
    pub fn randn(
        shape: impl Into<Shape>,
        std: f32,
        rng: &mut Rng,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let data = (0..shape.numel()).map(|_| std * rng.normal()).collect();
        Tensor::from_vec(data, shape, tag, device)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(
        shape: impl Into<Shape>,
        lo: f32,
        hi: f32,
        rng: &mut Rng,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let data = (0..shape.numel()).map(|_| rng.uniform(lo, hi)).collect();
        Tensor::from_vec(data, shape, tag, device)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn tag(&self) -> MemTag {
        self.tag
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn size_in_bytes(&self) -> u64 {
        (self.numel() * self.dtype.size_in_bytes()) as u64
    }

    /// Move this tensor's bytes to another tag in the accounting.
    pub fn set_tag(&mut self, tag: MemTag) {
        let bytes = self.size_in_bytes();
        self.device.memory().free(self.tag, bytes);
        self.device.memory().alloc(tag, bytes);
        self.tag = tag;
    }

    /// The same data under a new shape with the same number of elements.
    pub fn reshape(mut self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape("reshape", &self.shape, &shape));
        }
        self.shape = shape;
        Ok(self)
    }

    /// A deep copy, accounted under `tag`.
    pub fn copy(&self, tag: MemTag) -> Result<Tensor> {
        Tensor::from_vec(self.to_vec()?, self.shape.clone(), tag, &self.device)
    }

    /// The elements, copied to the host.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.clone()),
        }
    }

    /// The elements of a CPU tensor, borrowed.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
        }
    }

    /// The elements of a CPU tensor, borrowed mutably.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
        }
    }

    /// The single value of a one-element tensor.
    pub fn scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::invalid(
                "scalar",
                format!("tensor of shape {} is not a scalar", self.shape),
            ));
        }
        Ok(self.to_vec()?[0])
    }

    /// Check that `other` lives on the same device as `self`, for op `op`.
    pub fn same_device(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.device.same(&other.device) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch {
                op,
                lhs: self.device.to_string(),
                rhs: other.device.to_string(),
            })
        }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        self.device.memory().free(self.tag, self.size_in_bytes());
        let Storage::Cpu(v) = std::mem::replace(&mut self.storage, Storage::Cpu(Vec::new()));
        self.device.recycle(v);
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({}, {}, {}, {})",
            self.shape,
            self.dtype.name(),
            self.tag,
            self.device
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_follows_tensor_lifetime_and_tags() {
        let dev = Device::cpu();
        let a = Tensor::zeros([4, 8], MemTag::Activations, &dev).unwrap();
        let mut b = Tensor::zeros([16], MemTag::Trainable, &dev).unwrap();
        let r = dev.memory().report();
        assert_eq!(r.live(MemTag::Activations), 128);
        assert_eq!(r.live(MemTag::Trainable), 64);
        assert_eq!(r.total_live, 192);
        b.set_tag(MemTag::Gradients);
        drop(a);
        let r = dev.memory().report();
        assert_eq!(r.live(MemTag::Activations), 0);
        assert_eq!(r.peak(MemTag::Activations), 128);
        assert_eq!(r.live(MemTag::Gradients), 64);
        assert_eq!(r.live(MemTag::Trainable), 0);
        assert_eq!(r.total_peak, 192);
        drop(b);
        dev.memory().reset_peaks();
        assert_eq!(dev.memory().report().total_peak, 0);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let dev = Device::cpu();
        let e = Tensor::from_vec(vec![1.0; 5], [2, 3], MemTag::Workspace, &dev).unwrap_err();
        assert!(e.to_string().contains("[2, 3]"), "{e}");
        let t = Tensor::zeros([2, 3], MemTag::Workspace, &dev).unwrap();
        let e = t.reshape([4, 2]).unwrap_err();
        assert!(e.to_string().contains("reshape"), "{e}");
    }
}
