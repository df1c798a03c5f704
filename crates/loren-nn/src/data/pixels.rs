//! A dataset's pixel values, all on the 0..=1 scale, kept as the loader had them: a byte each
//! where they are whole steps of 1/levels (CIFAR's and decoded images' 255 levels, the digits'
//! 16), a quarter of the memory of f32, and f32 where they are not (shifted, inverted and noise
//! images).

use std::borrow::Cow;

#[derive(Clone, Debug, PartialEq)]
pub enum Pixels {
    /// Any values in `[0, 1]`.
    F32(Vec<f32>),
    /// Byte `b` is the value `b / levels` (each byte at most `levels`).
    Steps { bytes: Vec<u8>, levels: u8 },
}

impl From<Vec<f32>> for Pixels {
    fn from(v: Vec<f32>) -> Pixels {
        Pixels::F32(v)
    }
}

impl Pixels {
    /// The value of byte `b` out of `levels`: `f32::from(b) / f32::from(levels)`, the loaders'
    /// own division, so a value read back is the f32 they computed, bit for bit.
    #[inline]
    fn step(b: u8, levels: u8) -> f32 {
        f32::from(b) / f32::from(levels)
    }

    /// `values` (in `[0, 1]`) rounded to the nearest of `levels` steps, as an 8-bit image
    /// stores them.
    pub fn quantized(values: &[f32], levels: u8) -> Vec<u8> {
        let scale = f32::from(levels);
        values
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * scale).round() as u8)
            .collect()
    }

    pub fn len(&self) -> usize {
        match self {
            Pixels::F32(v) => v.len(),
            Pixels::Steps { bytes, .. } => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes they take in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Pixels::F32(v) => std::mem::size_of_val(v.as_slice()),
            Pixels::Steps { bytes, .. } => bytes.len(),
        }
    }

    /// Values `start..start + out.len()` written to `out` as f32.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Pixels::F32(v) => out.copy_from_slice(&v[start..end]),
            Pixels::Steps { bytes, levels } => {
                for (o, &b) in out.iter_mut().zip(&bytes[start..end]) {
                    *o = Pixels::step(b, *levels);
                }
            }
        }
    }

    /// Values `start..end` as f32: borrowed when they are f32 already.
    pub fn range(&self, start: usize, end: usize) -> Cow<'_, [f32]> {
        match self {
            Pixels::F32(v) => Cow::Borrowed(&v[start..end]),
            Pixels::Steps { .. } => {
                let mut out = vec![0.0; end - start];
                self.read(start, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Every value as f32.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        self.range(0, self.len())
    }

    /// The runs of `run` values starting at each of `starts`, in that order, kept as they are
    /// kept here.
    pub fn gather(&self, starts: impl Iterator<Item = usize>, run: usize) -> Pixels {
        fn take<T: Copy>(v: &[T], starts: impl Iterator<Item = usize>, run: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(starts.size_hint().0 * run);
            for s in starts {
                out.extend_from_slice(&v[s..s + run]);
            }
            out
        }
        match self {
            Pixels::F32(v) => Pixels::F32(take(v, starts, run)),
            Pixels::Steps { bytes, levels } => Pixels::Steps {
                bytes: take(bytes, starts, run),
                levels: *levels,
            },
        }
    }

    /// The first value outside `[0, 1]`, with its index.
    pub fn first_out_of_range(&self) -> Option<(usize, f32)> {
        match self {
            Pixels::F32(v) => v
                .iter()
                .position(|x| !(0.0..=1.0).contains(x))
                .map(|i| (i, v[i])),
            Pixels::Steps { bytes, levels } => bytes
                .iter()
                .position(|b| b > levels)
                .map(|i| (i, Pixels::step(bytes[i], *levels))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_steps_read_back_as_the_loaders_division() {
        let bytes: Vec<u8> = (0..=255).collect();
        let p = Pixels::Steps {
            bytes: bytes.clone(),
            levels: 255,
        };
        let want: Vec<f32> = bytes.iter().map(|&b| f32::from(b) / 255.0).collect();
        assert_eq!(p.to_f32().as_ref(), want.as_slice());
        let mut out = [f32::NAN; 3];
        p.read(254, &mut out[..2]);
        assert_eq!(out[..2], [254.0 / 255.0, 1.0]);
        assert!(out[2].is_nan(), "only out.len() values are written");
        assert_eq!(p.memory_bytes(), 256);
        assert_eq!(Pixels::F32(want).memory_bytes(), 1024);
    }

    #[test]
    fn data_quantized_rounds_to_the_nearest_step() {
        let q = Pixels::quantized(
            &[0.0, 0.5 / 255.0 - 1e-6, 0.5 / 255.0 + 1e-6, 1.0, 1.5],
            255,
        );
        assert_eq!(q, [0, 0, 1, 255, 255]);
        assert_eq!(Pixels::quantized(&[0.5], 16), [8]);
    }

    #[test]
    fn data_gather_keeps_the_kind_and_the_order() {
        let f = Pixels::F32(vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5]);
        assert_eq!(
            f.gather([4, 0].into_iter(), 2),
            Pixels::F32(vec![0.4, 0.5, 0.0, 0.1])
        );
        let s = Pixels::Steps {
            bytes: vec![1, 2, 3, 4],
            levels: 16,
        };
        assert_eq!(
            s.gather([2].into_iter(), 2),
            Pixels::Steps {
                bytes: vec![3, 4],
                levels: 16
            }
        );
    }

    #[test]
    fn data_out_of_range_values_are_found_in_either_kind() {
        assert_eq!(
            Pixels::F32(vec![0.0, 1.5]).first_out_of_range(),
            Some((1, 1.5))
        );
        let s = Pixels::Steps {
            bytes: vec![16, 17],
            levels: 16,
        };
        assert_eq!(s.first_out_of_range(), Some((1, 17.0 / 16.0)));
        assert_eq!(Pixels::F32(vec![0.0, 1.0]).first_out_of_range(), None);
    }
}
