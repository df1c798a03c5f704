use std::fmt;

use rayon::prelude::*;

use loren_kernels::bf16;
use loren_kernels::{CudaSlice, Gpu};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::rng::Rng;
use crate::shape::Shape;

enum Storage {
    Cpu(Vec<f32>),
    Cuda(CudaBuf),
}

/// A tensor's memory on a GPU, in its dtype.
pub(crate) enum CudaBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

/// A contiguous, row-major tensor that owns its memory and accounts for it on its device under
/// its [`MemTag`] for as long as it lives.
///
/// On the CPU every tensor is f32. On a GPU a tensor is f32 or bf16, as its op asked
/// ([`Device::storage_dtype`]); the host sees f32 either way ([`Tensor::to_vec`]).
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    tag: MemTag,
    storage: Storage,
    device: Device,
}

/// Values copied into host memory from which they become a tensor on `device` without another
/// copy on the host ([`Tensor::from_staged`]): a buffer from the device's pool on the CPU, a
/// page-locked staging buffer on a GPU ([`Gpu::stage`]), in f32 or (on a GPU) bf16. Making one
/// is the host's pass over the data, and it may run on any thread: the thread that makes the
/// batches stages each one, so the thread that runs the step only queues the copy.
pub struct Staged {
    shape: Shape,
    device: Device,
    host: StagedHost,
}

enum StagedHost {
    Cpu(Vec<f32>),
    Cuda(loren_kernels::Staged<f32>),
    CudaBf16(loren_kernels::Staged<bf16>),
}

impl Staged {
    /// `data`, which must fill `shape`, staged for `device` as f32.
    pub fn new(data: &[f32], shape: impl Into<Shape>, device: &Device) -> Result<Staged> {
        Staged::new_as(data, shape, DType::F32, device)
    }

    /// `data` staged to become a tensor of `dtype`: bf16 rounds to nearest even on the host, so a
    /// GPU gets half the bytes (the CPU keeps f32).
    pub fn new_as(
        data: &[f32],
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Staged> {
        let shape = filled_shape(data.len(), shape.into())?;
        let host = match (device.gpu(), device.storage_dtype(dtype)) {
            (None, _) => {
                let mut v = device.host_buffer(data.len());
                v.copy_from_slice(data);
                StagedHost::Cpu(v)
            }
            (Some(gpu), DType::F32) => {
                StagedHost::Cuda(gpu.stage(data.len(), |h| fill_f32(h, data))?)
            }
            (Some(gpu), DType::BF16) => {
                StagedHost::CudaBf16(gpu.stage(data.len(), |h| fill_bf16(h, data))?)
            }
        };
        Ok(Staged {
            shape,
            device: device.clone(),
            host,
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The device the values are staged for.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Tensor {
    /// Adopt `data` as an f32 tensor of `shape` on `device` (copied there for a GPU).
    pub fn from_vec(
        data: Vec<f32>,
        shape: impl Into<Shape>,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::from_vec_as(data, shape, DType::F32, tag, device)
    }

    /// `data` as a tensor of `dtype` (bf16 rounds to nearest even; the CPU keeps f32).
    pub fn from_vec_as(
        data: Vec<f32>,
        shape: impl Into<Shape>,
        dtype: DType,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = filled_shape(data.len(), shape.into())?;
        let dtype = device.storage_dtype(dtype);
        let storage = match device.gpu() {
            None => Storage::Cpu(data),
            Some(gpu) => Storage::Cuda(upload(gpu, &data, dtype)?),
        };
        Ok(Tensor::adopt(storage, shape, dtype, tag, device))
    }

    /// A copy of `data` as an f32 tensor of `shape` on `device`, for data the caller keeps:
    /// [`Staged::new`] then [`Tensor::from_staged`], on this thread.
    pub fn from_slice(
        data: &[f32],
        shape: impl Into<Shape>,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::from_staged(Staged::new(data, shape, device)?, tag)
    }

    /// The tensor `staged` holds, on its device, of the dtype it was staged as: on the CPU the
    /// staged buffer itself, on a GPU a new buffer with the copy from the staged one queued on
    /// the stream.
    pub fn from_staged(staged: Staged, tag: MemTag) -> Result<Tensor> {
        let Staged {
            shape,
            device,
            host,
        } = staged;
        let (storage, dtype) = match host {
            StagedHost::Cpu(v) => (Storage::Cpu(v), DType::F32),
            StagedHost::Cuda(s) => {
                let gpu = device.require_gpu("from_staged")?;
                (
                    Storage::Cuda(CudaBuf::F32(gpu.upload_staged(s)?)),
                    DType::F32,
                )
            }
            StagedHost::CudaBf16(s) => {
                let gpu = device.require_gpu("from_staged")?;
                (
                    Storage::Cuda(CudaBuf::Bf16(gpu.upload_staged(s)?)),
                    DType::BF16,
                )
            }
        };
        Ok(Tensor::adopt(storage, shape, dtype, tag, &device))
    }

    fn adopt(storage: Storage, shape: Shape, dtype: DType, tag: MemTag, device: &Device) -> Tensor {
        device
            .memory()
            .alloc(tag, (shape.numel() * dtype.size_in_bytes()) as u64);
        Tensor {
            shape,
            dtype,
            tag,
            storage,
            device: device.clone(),
        }
    }

    /// An f32 tensor whose contents are unspecified (stale values from reused memory, never
    /// uninitialised): for outputs the op writes in full, so nothing is spent zeroing them.
    pub fn empty(shape: impl Into<Shape>, tag: MemTag, device: &Device) -> Result<Tensor> {
        Tensor::empty_as(shape, DType::F32, tag, device)
    }

    /// [`Tensor::empty`] of `dtype`. In test builds the contents are NaN, so an element an op
    /// forgets to write shows in the results (on a GPU as on the CPU).
    pub fn empty_as(
        shape: impl Into<Shape>,
        dtype: DType,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let dtype = device.storage_dtype(dtype);
        let n = shape.numel();
        let storage = match device.gpu() {
            None => {
                let mut data = device.host_buffer(n);
                if cfg!(debug_assertions) {
                    data.fill(f32::NAN);
                }
                Storage::Cpu(data)
            }
            Some(gpu) => {
                let mut buf = alloc(gpu, n, dtype)?;
                if cfg!(debug_assertions) {
                    buf.fill(gpu, n, f32::NAN)?;
                }
                Storage::Cuda(buf)
            }
        };
        Ok(Tensor::adopt(storage, shape, dtype, tag, device))
    }

    pub fn zeros(shape: impl Into<Shape>, tag: MemTag, device: &Device) -> Result<Tensor> {
        Tensor::full_as(0.0, shape, DType::F32, tag, device)
    }

    pub fn zeros_as(
        shape: impl Into<Shape>,
        dtype: DType,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::full_as(0.0, shape, dtype, tag, device)
    }

    pub fn full(
        value: f32,
        shape: impl Into<Shape>,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::full_as(value, shape, DType::F32, tag, device)
    }

    pub fn full_as(
        value: f32,
        shape: impl Into<Shape>,
        dtype: DType,
        tag: MemTag,
        device: &Device,
    ) -> Result<Tensor> {
        let mut t = Tensor::empty_as(shape, dtype, tag, device)?;
        t.fill(value)?;
        Ok(t)
    }

    /// Set every element to `value`.
    pub fn fill(&mut self, value: f32) -> Result<()> {
        let n = self.numel();
        match &mut self.storage {
            Storage::Cpu(v) => v.fill(value),
            Storage::Cuda(buf) => buf.fill(self.device.require_gpu("fill")?, n, value)?,
        }
        Ok(())
    }

    /// Normal with mean 0 and standard deviation `std`, drawn on the host.
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

    /// Uniform in [lo, hi), drawn on the host.
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

    /// A deep copy on the same device, in the same dtype, accounted under `tag`.
    pub fn copy(&self, tag: MemTag) -> Result<Tensor> {
        self.copy_as(self.dtype, tag)
    }

    /// A deep copy in `dtype` (a cast when it differs), accounted under `tag`.
    pub fn copy_as(&self, dtype: DType, tag: MemTag) -> Result<Tensor> {
        match &self.storage {
            // The CPU keeps f32 whatever `dtype` asks.
            Storage::Cpu(v) => Tensor::from_slice(v, self.shape.clone(), tag, &self.device),
            Storage::Cuda(src) => {
                let gpu = self.device.require_gpu("copy")?;
                let mut out = Tensor::empty_as(self.shape.clone(), dtype, tag, &self.device)?;
                let n = self.numel();
                let Storage::Cuda(dst) = &mut out.storage else {
                    unreachable!("a GPU tensor")
                };
                match (src, dst) {
                    (CudaBuf::F32(s), CudaBuf::F32(d)) => {
                        gpu.stream().memcpy_dtod(s, d).map_err(cuda("copy"))?
                    }
                    (CudaBuf::Bf16(s), CudaBuf::Bf16(d)) => {
                        gpu.stream().memcpy_dtod(s, d).map_err(cuda("copy"))?
                    }
                    (CudaBuf::F32(s), CudaBuf::Bf16(d)) => gpu.f32_to_bf16(n, s, d)?,
                    (CudaBuf::Bf16(s), CudaBuf::F32(d)) => gpu.bf16_to_f32(n, s, d)?,
                }
                Ok(out)
            }
        }
    }

    /// Overwrite the elements from the host (converted to the tensor's dtype).
    pub fn copy_from_host(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::invalid(
                "copy_from_host",
                format!("{} values for a tensor of shape {}", data.len(), self.shape),
            ));
        }
        match &mut self.storage {
            Storage::Cpu(v) => v.copy_from_slice(data),
            Storage::Cuda(buf) => {
                let stream = self.device.require_gpu("copy_from_host")?.stream();
                match buf {
                    CudaBuf::F32(d) => stream
                        .memcpy_htod(data, d)
                        .map_err(cuda("copy_from_host"))?,
                    CudaBuf::Bf16(d) => {
                        let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                        stream.memcpy_htod(&h, d).map_err(cuda("copy_from_host"))?
                    }
                }
            }
        }
        Ok(())
    }

    /// The elements, copied to the host as f32 (waiting for the GPU).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Cuda(buf) => {
                let stream = self.device.require_gpu("to_vec")?.stream();
                match buf {
                    CudaBuf::F32(s) => stream.clone_dtoh(s).map_err(cuda("to_vec")),
                    CudaBuf::Bf16(s) => Ok(stream
                        .clone_dtoh(s)
                        .map_err(cuda("to_vec"))?
                        .into_iter()
                        .map(bf16::to_f32)
                        .collect()),
                }
            }
        }
    }

    /// The elements of a CPU tensor, borrowed.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => Err(self.on_gpu("as_slice")),
        }
    }

    /// The elements of a CPU tensor, borrowed mutably.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => Err(Error::Unsupported {
                op: "as_mut_slice",
                device: self.device.to_string(),
            }),
        }
    }

    fn on_gpu(&self, op: &'static str) -> Error {
        Error::Unsupported {
            op,
            device: self.device.to_string(),
        }
    }

    /// The f32 memory of a GPU tensor.
    pub(crate) fn cu_f32(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match &self.storage {
            Storage::Cuda(CudaBuf::F32(s)) => Ok(s),
            _ => Err(self.wrong_storage(op, DType::F32)),
        }
    }

    pub(crate) fn cu_f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>> {
        if !matches!(self.storage, Storage::Cuda(CudaBuf::F32(_))) {
            return Err(self.wrong_storage(op, DType::F32));
        }
        match &mut self.storage {
            Storage::Cuda(CudaBuf::F32(s)) => Ok(s),
            _ => unreachable!("checked above"),
        }
    }

    /// The bf16 memory of a GPU tensor.
    pub(crate) fn cu_bf16(&self, op: &'static str) -> Result<&CudaSlice<bf16>> {
        match &self.storage {
            Storage::Cuda(CudaBuf::Bf16(s)) => Ok(s),
            _ => Err(self.wrong_storage(op, DType::BF16)),
        }
    }

    pub(crate) fn cu_bf16_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<bf16>> {
        if !matches!(self.storage, Storage::Cuda(CudaBuf::Bf16(_))) {
            return Err(self.wrong_storage(op, DType::BF16));
        }
        match &mut self.storage {
            Storage::Cuda(CudaBuf::Bf16(s)) => Ok(s),
            _ => unreachable!("checked above"),
        }
    }

    fn wrong_storage(&self, op: &'static str, want: DType) -> Error {
        Error::invalid(
            op,
            format!("needs a {} tensor on a GPU, got {self:?}", want.name()),
        )
    }

    /// Where a GPU tensor's memory starts on the device; None on the CPU.
    pub(crate) fn device_address(&self) -> Option<u64> {
        use loren_kernels::DevicePtr;
        let Storage::Cuda(buf) = &self.storage else {
            return None;
        };
        let stream = self.device.gpu()?.stream();
        Some(match buf {
            CudaBuf::F32(s) => s.device_ptr(stream).0,
            CudaBuf::Bf16(s) => s.device_ptr(stream).0,
        })
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

/// Map a driver error to a tensor error naming the op.
pub(crate) fn cuda(op: &'static str) -> impl Fn(loren_kernels::DriverError) -> Error {
    move |e| Error::invalid(op, format!("CUDA driver error: {e}"))
}

fn alloc(gpu: &Gpu, n: usize, dtype: DType) -> Result<CudaBuf> {
    let stream = gpu.stream();
    // SAFETY: the contents are unspecified, as `Tensor::empty_as` documents; every constructor
    // that hands the tensor out either fills it or is an op that writes every element.
    let buf = unsafe {
        match dtype {
            DType::F32 => CudaBuf::F32(stream.alloc::<f32>(n).map_err(cuda("alloc"))?),
            DType::BF16 => CudaBuf::Bf16(stream.alloc::<bf16>(n).map_err(cuda("alloc"))?),
        }
    };
    Ok(buf)
}

/// `data` on the GPU in `dtype`, from pageable memory: weights, once at load (data to stage goes
/// through [`Staged`]).
fn upload(gpu: &Gpu, data: &[f32], dtype: DType) -> Result<CudaBuf> {
    let stream = gpu.stream();
    Ok(match dtype {
        DType::F32 => CudaBuf::F32(stream.clone_htod(data).map_err(cuda("upload"))?),
        DType::BF16 => {
            let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            CudaBuf::Bf16(stream.clone_htod(&h).map_err(cuda("upload"))?)
        }
    })
}

/// Elements per task of a parallel fill of staging memory.
const FILL_CHUNK: usize = 1 << 16;

/// `h = data`, on the CPU pool's threads: a GPU run leaves them idle, and staging is the one big
/// pass the host makes over data (a batch's images: 19 MB of f32 at ViT-B).
fn fill_f32(h: &mut [f32], data: &[f32]) {
    h.par_chunks_mut(FILL_CHUNK)
        .zip(data.par_chunks(FILL_CHUNK))
        .for_each(|(o, i)| o.copy_from_slice(i));
}

/// `h = bf16(data)`, rounded to nearest even as the kernels' `to_bf16`, on the CPU pool's threads.
fn fill_bf16(h: &mut [bf16], data: &[f32]) {
    h.par_chunks_mut(FILL_CHUNK)
        .zip(data.par_chunks(FILL_CHUNK))
        .for_each(|(o, i)| {
            o.iter_mut()
                .zip(i)
                .for_each(|(o, &x)| *o = bf16::from_f32(x))
        });
}

/// `shape` when `len` values fill it, else the error naming both.
fn filled_shape(len: usize, shape: Shape) -> Result<Shape> {
    if len != shape.numel() {
        return Err(Error::invalid(
            "from_vec",
            format!(
                "{len} values do not fill shape {shape} ({} elements)",
                shape.numel()
            ),
        ));
    }
    Ok(shape)
}

impl CudaBuf {
    fn fill(&mut self, gpu: &Gpu, n: usize, value: f32) -> Result<()> {
        match self {
            CudaBuf::F32(s) => gpu.fill_f32(n, s, value)?,
            CudaBuf::Bf16(s) => gpu.fill_bf16(n, s, value)?,
        }
        Ok(())
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        self.device.memory().free(self.tag, self.size_in_bytes());
        if let Storage::Cpu(v) = std::mem::replace(&mut self.storage, Storage::Cpu(Vec::new())) {
            self.device.recycle(v);
        }
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

    /// Two CPU devices print alike, so the error says how two came to be.
    #[test]
    fn tensors_of_two_cpu_devices_are_refused_with_the_reason() {
        let (one, two) = (Device::cpu(), Device::cpu());
        let a = Tensor::zeros([2], MemTag::Activations, &one).unwrap();
        let b = Tensor::zeros([2], MemTag::Activations, &two).unwrap();
        let e = a.same_device(&b, "add").unwrap_err().to_string();
        assert!(
            e.starts_with(
                "add: tensors are on different devices (cpu and cpu): two devices opened apart"
            ),
            "{e}"
        );
        let c = Tensor::zeros([2], MemTag::Activations, &one).unwrap();
        assert!(a.same_device(&c, "add").is_ok());
    }

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
    fn from_slice_copies_into_a_pooled_buffer() {
        let dev = Device::cpu();
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        // A buffer of the size in the pool, dirty: from_slice must overwrite all of it.
        drop(Tensor::full(f32::NAN, [24], MemTag::Workspace, &dev).unwrap());
        let t = Tensor::from_slice(&data, [2, 3, 4], MemTag::Activations, &dev).unwrap();
        assert_eq!(t.dims(), &[2, 3, 4]);
        assert_eq!(t.to_vec().unwrap(), data);
        assert_eq!(dev.memory().report().live(MemTag::Activations), 96);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let dev = Device::cpu();
        let e = Tensor::from_vec(vec![1.0; 5], [2, 3], MemTag::Workspace, &dev).unwrap_err();
        assert!(e.to_string().contains("[2, 3]"), "{e}");
        let e = Tensor::from_slice(&[1.0; 7], [2, 3], MemTag::Workspace, &dev).unwrap_err();
        assert!(e.to_string().contains("7 values"), "{e}");
        let t = Tensor::zeros([2, 3], MemTag::Workspace, &dev).unwrap();
        let e = t.reshape([4, 2]).unwrap_err();
        assert!(e.to_string().contains("reshape"), "{e}");
    }
}
