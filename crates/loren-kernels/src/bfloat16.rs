//! bf16 as the device stores it.
//!
//! The bits of a `half::bf16`, in a type of this crate so that cudarc can hold it in device
//! memory without its own `f16` feature, which would pull `rand` and friends into every build
//! through `half`'s features.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// A bfloat16 value: 1 sign, 8 exponent and 7 mantissa bits, as the kernels' `__nv_bfloat16`.
#[allow(non_camel_case_types)]
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct bf16(u16);

impl bf16 {
    pub const ZERO: bf16 = bf16(0);
    pub const NAN: bf16 = bf16(0x7fc0);

    /// Round to nearest even.
    pub fn from_f32(x: f32) -> bf16 {
        bf16(half::bf16::from_f32(x).to_bits())
    }

    pub fn from_f64(x: f64) -> bf16 {
        bf16(half::bf16::from_f64(x).to_bits())
    }

    pub fn to_f32(self) -> f32 {
        half::bf16::from_bits(self.0).to_f32()
    }

    pub fn to_f64(self) -> f64 {
        half::bf16::from_bits(self.0).to_f64()
    }

    pub fn to_bits(self) -> u16 {
        self.0
    }

    pub fn from_bits(bits: u16) -> bf16 {
        bf16(bits)
    }
}

// SAFETY: a plain 2-byte value with no padding, laid out as the kernels' bf16.
unsafe impl DeviceRepr for bf16 {}
// SAFETY: all-zero bits are +0.0.
unsafe impl ValidAsZeroBits for bf16 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_like_half() {
        for x in [0.0f32, -1.5, 3.140625, 1e-3, 65504.0, f32::INFINITY] {
            assert_eq!(
                bf16::from_f32(x).to_bits(),
                half::bf16::from_f32(x).to_bits()
            );
            assert_eq!(bf16::from_f32(x).to_f32(), half::bf16::from_f32(x).to_f32());
        }
        assert!(bf16::NAN.to_f32().is_nan());
        assert_eq!(bf16::ZERO.to_f32(), 0.0);
    }
}
