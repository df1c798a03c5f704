//! Elementary functions written so the compiler can vectorise the loops that call them: no
//! library calls and no branches. The CUDA twins use the device's expf and erff; the two agree
//! to a few ulp, far inside the parity bound.

/// `f()`, compiled for AVX-512 where this CPU has it (checked once, at run time), else as built.
///
/// The loops it wraps are written lane by lane (separate multiplies and adds, no fused
/// multiply-add, fixed reduction orders), so 16 lanes give the same bits as 8, only sooner.
/// `f` must be `#[inline(always)]` or small enough to inline: only code inlined into the
/// wrapper is compiled for AVX-512.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        fn v4<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: avx512() said the CPU has every feature v4 is compiled for.
        return unsafe { v4(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
    })
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so n·ln2 is exact for the reduction.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// e^x to within 2 ulp over the normal range; 0 below it and +inf above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to r⁷ (error < 2e-8 relative),
    // and 2^n built in the exponent bits.
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is an integer in [-126, 127]. Adding 1.5·2²³ puts it in the low mantissa bits, which
    // reads it out with integer lanes; `n as i32` would be a saturating conversion that LLVM
    // does lane by lane, and it kept the loops calling exp from vectorising.
    let n_int = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    let y = p * scale;
    // Outside the clamp the true value is 0 (or inf); select without a branch.
    let y = if x < -87.0 { 0.0 } else { y };
    if x > 88.0 { f32::INFINITY } else { y }
}

/// erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26), the accuracy PyTorch's vectorised CPU
/// erf has.
///
/// Absolute, not relative: GELU's 1 + erf(z/√2) cancels in its negative tail, where gelu(−5)
/// (−1.43e-6) is 4% off and gelu(z) is 0 below about −5.54. PyTorch's GELU forms 1 + erf too, so
/// it rounds to 0 there as well (the CUDA twin's erff is good to 2 ulp, and its 1 + erff cancels
/// the same way). A form good relative to the value (z·Φ(z) through an erfc fit good to 1.2e-7
/// relative) made bias + GELU about 50% slower, 5% of the tiny training step, for values the
/// next product cannot see.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-x * x);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_library() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// Whatever lanes `wide` compiles for, each element's bits are those of the scalar code.
    #[test]
    fn wide_loops_give_the_bits_of_one_element_at_a_time() {
        let x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0047).collect();
        let f = |v: f32| exp(v) * erf(v) - exp(-0.5 * v * v);
        let mut got = vec![0.0f32; x.len()];
        wide(
            #[inline(always)]
            || {
                for (o, &v) in got.iter_mut().zip(&x) {
                    *o = f(v);
                }
            },
        );
        for (&v, &g) in x.iter().zip(&got) {
            let want = f(std::hint::black_box(v));
            assert_eq!(g.to_bits(), want.to_bits(), "at {v}: {g} against {want}");
        }
    }

    #[test]
    fn erf_matches_known_values() {
        // erf at a few points, from tables to 9 digits.
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_878),
            (1.0, 0.842_700_793),
            (2.0, 0.995_322_265),
            (-1.5, -0.966_105_146),
            (4.0, 0.999_999_985),
        ] {
            assert!(
                (erf(x) as f64 - want).abs() < 2e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }
}
