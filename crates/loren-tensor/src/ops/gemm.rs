//! Row-major matrix products on the CPU, through the `gemm-f32` kernels.

use gemm_common::Parallelism;

/// Whether an operand is read as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

/// `C = acc·C + alpha · op(A) · op(B)` for a contiguous row-major `C` of `m × n`.
///
/// `op(A)` is `m × k`: `A` is stored `m × k` (N) or `k × m` (T). `op(B)` is `k × n`: `B` is
/// stored `k × n` (N) or `n × k` (T). With `accumulate` false, `C` is overwritten.
/// `threads` > 1 splits the product across the rayon pool; call with 1 from inside a parallel
/// loop.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    // The lengths are what makes the raw-pointer call below sound.
    assert!(c.len() >= m * n, "matmul: C holds {} < {m}x{n}", c.len());
    assert!(a.len() >= m * k, "matmul: A holds {} < {m}x{k}", a.len());
    assert!(b.len() >= k * n, "matmul: B holds {} < {k}x{n}", b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_cs, a_rs) = match ta {
        Trans::N => (1, k as isize),
        Trans::T => (m as isize, 1),
    };
    let (b_cs, b_rs) = match tb {
        Trans::N => (1, n as isize),
        Trans::T => (k as isize, 1),
    };
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // The microkernels want a column-major destination, so hand them Cᵀ = op(B)ᵀ·op(A)ᵀ: for a
    // row-major C that is the column-major product with the operands (and their strides)
    // swapped. The gemm facade does the same before dispatching to these kernels.
    let gemm = gemm_f32::gemm::f32::get_gemm_fn();
    // SAFETY: the asserts above bound every index the strides reach: A spans m*k elements,
    // B spans k*n and C spans m*n, for either orientation; all strides are positive.
    unsafe {
        gemm(
            n,
            m,
            k,
            c.as_mut_ptr(),
            n as isize,
            1,
            accumulate,
            b.as_ptr(),
            b_rs,
            b_cs,
            a.as_ptr(),
            a_rs,
            a_cs,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Threads the rayon pool offers.
pub fn pool_threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], ta: Trans, b: &[f32], tb: Trans, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta == Trans::N {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    };
                    let bv = if tb == Trans::N {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_orientations_match_the_naive_product() {
        let mut rng = Rng::new(3);
        for &(m, n, k) in &[(17, 5, 9), (1, 1, 1), (64, 48, 33), (3, 130, 70)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
            for ta in [Trans::N, Trans::T] {
                for tb in [Trans::N, Trans::T] {
                    let want = naive(&a, ta, &b, tb, m, n, k);
                    for threads in [1, 2] {
                        let mut c = c0.clone();
                        matmul(&mut c, &a, ta, &b, tb, m, n, k, 0.5, true, threads);
                        for i in 0..m * n {
                            let w = c0[i] + 0.5 * want[i];
                            assert!(
                                (c[i] - w).abs() < 1e-4 * (1.0 + w.abs()),
                                "{ta:?}{tb:?} {i}"
                            );
                        }
                        matmul(&mut c, &a, ta, &b, tb, m, n, k, 1.0, false, threads);
                        for i in 0..m * n {
                            assert!((c[i] - want[i]).abs() < 1e-4 * (1.0 + want[i].abs()));
                        }
                    }
                }
            }
        }
    }
}
