//! A thin cuBLAS launcher for the GEMMs the hand-written kernels do not cover: the frozen MLP
//! products and the explicit ensemble's per-member weights (and heads). bf16 inputs, f32
//! compute, bf16 or f32 output, on the `Gpu`'s stream. cuBLAS is opened on first use.

use crate::bf16;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::positive;
use crate::error::{KernelError, Result};
use crate::gpu::Gpu;

/// A batch of row-major products `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]`, i < batch, with
/// op(A) [m, k] and op(B) [k, n]: A is stored [m, k] (or [k, m] when `trans_a`), B is stored
/// [k, n] (or [n, k] when `trans_b`, the `x·Wᵀ` case with W [n, k]), C [m, n]. Consecutive
/// matrices are `stride_*` elements apart (0 broadcasts one A or B over the batch; the C matrices
/// of a batch may not overlap).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    pub beta: f32,
}

/// The output of [`Gpu::gemm_bf16`].
pub enum GemmOut<'a> {
    Bf16(&'a mut dyn DevicePtrMut<bf16>),
    F32(&'a mut dyn DevicePtrMut<f32>),
}

fn need(batch: usize, stride: usize, size: usize) -> usize {
    (batch - 1) * stride + size
}

impl Gpu {
    /// Run [`Gemm`] through cublasGemmStridedBatchedEx with bf16 A and B and f32 compute.
    /// (Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so B goes first.)
    pub fn gemm_bf16(
        &self,
        g: &Gemm,
        a: &dyn DevicePtr<bf16>,
        b: &dyn DevicePtr<bf16>,
        c: GemmOut<'_>,
    ) -> Result<()> {
        const OP: &str = "gemm_bf16";
        for (what, v) in [("m", g.m), ("n", g.n), ("k", g.k), ("batch", g.batch)] {
            positive(OP, what, v)?;
        }
        let small = |what: &str, v: usize| {
            i32::try_from(v)
                .map_err(|_| KernelError::invalid(OP, format!("{what} = {v} exceeds i32")))
        };
        // A and B may be read by several products (stride 0 broadcasts one); C may not be
        // written by several, which cuBLAS runs in no set order.
        if g.batch > 1 && g.stride_c < g.m * g.n {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "C matrices of {}×{} a stride of {} apart overlap",
                    g.m, g.n, g.stride_c
                ),
            ));
        }
        let (m, n, k) = (small("m", g.m)?, small("n", g.n)?, small("k", g.k)?);
        let batch = small("batch", g.batch)?;
        let a = self.input(OP, "A", a, need(g.batch, g.stride_a, g.m * g.k))?;
        let b = self.input(OP, "B", b, need(g.batch, g.stride_b, g.k * g.n))?;
        let c_need = need(g.batch, g.stride_c, g.m * g.n);
        let (c, c_type) = match c {
            GemmOut::Bf16(c) => (
                self.output(OP, "C", c, c_need)?,
                cudaDataType_t::CUDA_R_16BF,
            ),
            GemmOut::F32(c) => (self.output(OP, "C", c, c_need)?, cudaDataType_t::CUDA_R_32F),
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let lda_b = if g.trans_b { k } else { n };
        let ldb_a = if g.trans_a { m } else { k };
        let blas = self.blas()?;
        // cudarc binds the context before its own calls; this raw cuBLAS call must do so too, or
        // on a thread with another context current (a device other than 0) it runs in that one.
        self.context()
            .bind_to_thread()
            .map_err(KernelError::driver("binding the context for cuBLAS"))?;
        // SAFETY: the lengths of A, B and C cover every matrix of the batch (checked above), and
        // the handle is bound to this Gpu's stream.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(g.trans_b),
                op(g.trans_a),
                n,
                m,
                k,
                (&g.alpha) as *const f32 as *const _,
                b.ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                lda_b,
                g.stride_b as i64,
                a.ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                ldb_a,
                g.stride_a as i64,
                (&g.beta) as *const f32 as *const _,
                c.ptr as *mut _,
                c_type,
                n,
                g.stride_c as i64,
                batch,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Blas {
            what: OP,
            msg: format!("{e:?}"),
        })
    }
}
