//! Separable image resampling, antialiased when shrinking, and the datasets that resize on the
//! way out.
//!
//! Each output pixel is a normalised weighted sum of the source pixels under a filter kernel
//! centred on it (pixel `i` covers `[i, i+1)`, so the grids' centres line up as with
//! `align_corners=False`). When shrinking, the kernel is stretched by the ratio so every source
//! pixel contributes (antialiasing), as PIL and torchvision's `Resize(antialias=True)` do; when
//! enlarging, [`Filter::Bilinear`] is exactly PyTorch's bilinear upsampling, edges included.
//! Taps that fall outside the image are dropped and the rest renormalised.

use super::{Dataset, Pixels};

/// The resampling kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// The triangle (tent) kernel, support 1.
    Bilinear,
    /// Keys' cubic convolution with a = −0.5, support 2: PIL's BICUBIC, and what PyTorch's
    /// antialiased bicubic (which timm uses for position embeddings) computes.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The source pixels one output pixel reads along one axis: the first index and the weights.
#[derive(Clone, Debug)]
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// For each of `out_len` output positions, the normalised taps over `in_len` source positions.
fn axis_taps(in_len: usize, out_len: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_len as f64 / out_len as f64;
    // Stretching the kernel when shrinking makes it a low-pass filter: no aliasing.
    let stretch = scale.max(1.0);
    let support = filter.support() * stretch;
    (0..out_len)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(in_len);
            let raw: Vec<f64> = (lo..hi)
                .map(|i| filter.weight((i as f64 + 0.5 - center) / stretch))
                .collect();
            let total: f64 = raw.iter().sum();
            Taps {
                start: lo,
                weights: raw.iter().map(|w| (w / total) as f32).collect(),
            }
        })
        .collect()
}

/// A resize of `[C, H, W]` images from one size to another, its taps computed once.
#[derive(Clone, Debug)]
pub struct Resampler {
    from: [usize; 2],
    to: [usize; 2],
    rows: Vec<Taps>,
    cols: Vec<Taps>,
}

impl Resampler {
    /// Resize from `[h, w]` to `[out_h, out_w]`; every size must be positive.
    pub fn new(from: [usize; 2], to: [usize; 2], filter: Filter) -> Resampler {
        assert!(
            from.iter().chain(&to).all(|&n| n > 0),
            "resize {from:?} -> {to:?}: sizes must be positive"
        );
        Resampler {
            from,
            to,
            rows: axis_taps(from[0], to[0], filter),
            cols: axis_taps(from[1], to[1], filter),
        }
    }

    /// Resize `src` (`[C, H, W]`) into `dst` (`[C, out_h, out_w]`): columns first, then rows.
    pub fn apply(&self, src: &[f32], dst: &mut [f32]) {
        let [h, w] = self.from;
        let channels = src.len() / (h * w);
        assert_eq!(src.len(), channels * h * w, "resize: source size");
        let copy = |y: usize, row: &mut [f32]| {
            for (c, out) in row.chunks_exact_mut(w).enumerate() {
                out.copy_from_slice(&src[(c * h + y) * w..][..w]);
            }
            Ok::<(), std::convert::Infallible>(())
        };
        let Ok(()) = self.apply_rows(channels, copy, dst);
    }

    /// Resize `[channels, H, W]` pixels that `row(y, out)` writes a row at a time, in order
    /// (`out` is `[channels, W]`), into `dst` (`[channels, out_h, out_w]`): the source need never
    /// be held whole, so that a large photo can be read and resized as it is decoded. Stops at
    /// the first error `row` returns.
    pub fn apply_rows<E>(
        &self,
        channels: usize,
        mut row: impl FnMut(usize, &mut [f32]) -> Result<(), E>,
        dst: &mut [f32],
    ) -> Result<(), E> {
        let ([h, w], [oh, ow]) = (self.from, self.to);
        assert_eq!(dst.len(), channels * oh * ow, "resize: destination size");
        let mut src_row = vec![0.0f32; channels * w];
        // Every channel's rows, resized along x: [channels, h, ow].
        let mut wide = vec![0.0f32; channels * h * ow];
        for y in 0..h {
            row(y, &mut src_row)?;
            for (c, plane) in src_row.chunks_exact(w).enumerate() {
                let wide_row = &mut wide[(c * h + y) * ow..][..ow];
                for (o, taps) in wide_row.iter_mut().zip(&self.cols) {
                    *o = dot(&plane[taps.start..], &taps.weights);
                }
            }
        }
        for (wide, out) in wide.chunks_exact(h * ow).zip(dst.chunks_exact_mut(oh * ow)) {
            for (y, taps) in self.rows.iter().enumerate() {
                let out_row = &mut out[y * ow..(y + 1) * ow];
                out_row.fill(0.0);
                for (k, &wt) in taps.weights.iter().enumerate() {
                    let src_row = &wide[(taps.start + k) * ow..][..ow];
                    out_row
                        .iter_mut()
                        .zip(src_row)
                        .for_each(|(o, &s)| *o += wt * s);
                }
            }
        }
        Ok(())
    }
}

fn dot(values: &[f32], weights: &[f32]) -> f32 {
    values.iter().zip(weights).map(|(v, w)| v * w).sum()
}

/// `src` (`[C, H, W]`) resized to `[C, out_h, out_w]`.
pub fn resize(src: &[f32], from: [usize; 2], to: [usize; 2], filter: Filter) -> Vec<f32> {
    let channels = src.len() / (from[0] * from[1]).max(1);
    let mut dst = vec![0.0; channels * to[0] * to[1]];
    Resampler::new(from, to, filter).apply(src, &mut dst);
    dst
}

/// `[C, H, W]` pixels converted to `channels`: grey is repeated into each colour channel, and
/// colour becomes grey by ITU-R BT.601 luma (PIL's `convert("L")`).
///
/// Panics on other conversions: callers ask only for 1 or 3 channels of 1- or 3-channel images.
pub fn convert_channels(image: &[f32], from: usize, to: usize) -> Vec<f32> {
    let plane = image.len() / from;
    match (from, to) {
        (a, b) if a == b => image.to_vec(),
        (1, n) => image.repeat(n),
        (3, 1) => (0..plane)
            .map(|p| luma(image[p], image[plane + p], image[2 * plane + p]))
            .collect(),
        _ => panic!("convert_channels: {from} to {to} channels is not supported"),
    }
}

/// The grey of a colour pixel, ITU-R BT.601 luma (PIL's `convert("L")`), within [0, 1].
pub fn luma(r: f32, g: f32, b: f32) -> f32 {
    luma_of(&[r, g, b]).clamp(0.0, 1.0)
}

/// BT.601's weighted sum of red, green and blue figures.
pub(crate) fn luma_of(rgb: &[f32]) -> f32 {
    0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
}

impl Dataset {
    /// The same images, resized to `[height, width]` by [`Dataset::batch`] after augmentation.
    ///
    /// Images stay in memory at their own size (CIFAR's 32×32 is 49 times smaller than a
    /// ViT-B's 224×224), augmentation and the shift and OOD corruptions work at that size, and
    /// only batches are made at the model's. A no-op when the size is already `[height, width]`.
    pub fn resized_on_batch(mut self, height: usize, width: usize) -> Dataset {
        self.resize_to = ([height, width] != [self.height, self.width]).then_some([height, width]);
        self
    }

    /// `[channels, height, width]` of the images [`Dataset::batch`] returns.
    pub fn batch_shape(&self) -> [usize; 3] {
        let [h, w] = self.resize_to.unwrap_or([self.height, self.width]);
        [self.channels, h, w]
    }

    /// The resize `batch` applies, if any.
    pub(crate) fn batch_resampler(&self) -> Option<Resampler> {
        self.resize_to
            .map(|to| Resampler::new([self.height, self.width], to, Filter::Bilinear))
    }

    /// The same dataset with `channels` channels (see [`convert_channels`]).
    pub fn with_channels(mut self, channels: usize) -> Dataset {
        if channels == self.channels {
            return self;
        }
        let n = self.image_len();
        self.images = match (&self.images, self.channels) {
            // Grey repeated into colour keeps its steps; luma does not.
            (Pixels::Steps { bytes, levels }, 1) => Pixels::Steps {
                bytes: bytes
                    .chunks_exact(n)
                    .flat_map(|img| img.repeat(channels))
                    .collect(),
                levels: *levels,
            },
            // An image at a time: all of them as f32 at once would be four times the bytes.
            (pixels, from) => {
                let mut image = vec![0.0; n];
                let mut out = Vec::with_capacity(self.labels.len() * n / from * channels);
                for i in 0..self.labels.len() {
                    pixels.read(i * n, &mut image);
                    out.extend(convert_channels(&image, from, channels));
                }
                Pixels::F32(out)
            }
        };
        // Grey is the luma of colour, so its mean is the luma of the channels' means, exactly;
        // its std is the luma of their stds where the channels move together, as a natural
        // image's nearly do (the bound it cannot pass). Colour from grey repeats its figures.
        let (mean, std) = match self.channels {
            3 => (luma_of(&self.norm_mean), luma_of(&self.norm_std)),
            _ => (self.norm_mean[0], self.norm_std[0]),
        };
        self.norm_mean = vec![mean; channels];
        self.norm_std = vec![std; channels];
        self.channels = channels;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Colour made grey scales by the grey's own figures; grey made colour repeats its own.
    #[test]
    fn data_channel_conversion_carries_the_normalisation() {
        let names = vec!["a".to_string()];
        let d = Dataset::new("t", [3, 1, 1], vec![0.5; 3], vec![0], names).unwrap();
        let d = d
            .with_normalization(vec![0.1, 0.4, 0.7], vec![0.2, 0.3, 0.6])
            .unwrap();
        let grey = d.with_channels(1);
        let mean = 0.299 * 0.1 + 0.587 * 0.4 + 0.114 * 0.7;
        let std = 0.299 * 0.2 + 0.587 * 0.3 + 0.114 * 0.6;
        assert!(
            (grey.norm_mean[0] - mean).abs() < 1e-6,
            "{:?}",
            grey.norm_mean
        );
        assert!((grey.norm_std[0] - std).abs() < 1e-6, "{:?}", grey.norm_std);
        let colour = grey.with_channels(3);
        assert_eq!(colour.norm_mean, [colour.norm_mean[0]; 3]);
        assert!((colour.norm_mean[0] - mean).abs() < 1e-6);
        assert!((colour.norm_std[0] - std).abs() < 1e-6);
    }

    #[test]
    fn data_resize_to_the_same_size_is_exact() {
        let img: Vec<f32> = (0..2 * 5 * 7).map(|i| (i as f32 * 0.37).sin()).collect();
        for f in [Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(resize(&img, [5, 7], [5, 7], f), img);
        }
    }

    #[test]
    fn data_resize_keeps_constants_and_ranges() {
        let img = vec![0.25f32; 3 * 9 * 6];
        for (to, f) in [([20, 13], Filter::Bilinear), ([4, 3], Filter::Bicubic)] {
            let out = resize(&img, [9, 6], to, f);
            assert_eq!(out.len(), 3 * to[0] * to[1]);
            assert!(out.iter().all(|x| (x - 0.25).abs() < 1e-6), "{f:?}");
        }
    }

    #[test]
    fn data_bicubic_shrinking_is_antialiased_as_pil_computes_it() {
        // 4 → 2: scale 2, so the kernel widens to support 4 and each output pixel weighs every
        // input pixel. Output 0 centres at 1; inputs j sit at (j + 0.5 − 1)/2 = −0.25, 0.25,
        // 0.75, 1.25 of the widened kernel, where Keys' cubic (a = −0.5) is 0.8671875,
        // 0.8671875, 0.2265625 and −0.0703125 (sum 1.890625). On the ramp 0, 1, 2, 3:
        // (0.8671875 + 2·0.2265625 − 3·0.0703125) / 1.890625 = 1.109375 / 1.890625; output 1
        // mirrors it.
        let first = 1.109375 / 1.890625;
        let want = [first, 3.0 - first];
        let out = resize(&[0.0, 1.0, 2.0, 3.0], [1, 4], [1, 2], Filter::Bicubic);
        for (o, w) in out.iter().zip(want) {
            assert!((f64::from(*o) - w).abs() < 1e-6, "{out:?} against {want:?}");
        }
        // The same along the other axis, one column at a time.
        let out = resize(
            &[0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0],
            [4, 2],
            [2, 2],
            Filter::Bicubic,
        );
        let want = [first, 10.0 + first, 3.0 - first, 13.0 - first];
        for (o, w) in out.iter().zip(want) {
            assert!((f64::from(*o) - w).abs() < 1e-5, "{out:?} against {want:?}");
        }
    }

    #[test]
    fn data_bilinear_upsampling_matches_pytorch() {
        // F.interpolate([[0, 1]], size=4, mode="bilinear", align_corners=False) on one row:
        // source coords -0.25, 0.25, 0.75, 1.25 clamp to [0, 1]: 0, 0.25, 0.75, 1.
        let out = resize(&[0.0, 1.0], [1, 2], [1, 4], Filter::Bilinear);
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
        // 2x2 -> 4x4 is the outer product of that ramp in each direction.
        let out = resize(&[0.0, 1.0, 2.0, 3.0], [2, 2], [4, 4], Filter::Bilinear);
        let ramp = [0.0, 0.25, 0.75, 1.0];
        for y in 0..4 {
            for x in 0..4 {
                let want = ramp[x] + 2.0 * ramp[y];
                assert!((out[y * 4 + x] - want).abs() < 1e-6, "({y},{x})");
            }
        }
    }

    #[test]
    fn data_shrinking_averages_every_source_pixel() {
        // Halving a row with the stretched tent filter weighs 1/8, 3/8, 3/8, 1/8 around each
        // output pixel; a plain bilinear sample would read only two pixels.
        let out = resize(
            &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
            [1, 6],
            [1, 3],
            Filter::Bilinear,
        );
        // Middle: taps 1..5 weigh 1, 3, 3, 1 over 0, 1, 1, 0: 6/8.
        assert!((out[1] - 0.75).abs() < 1e-6, "{out:?}");
        // Edges: the tap outside is dropped, leaving 3, 3, 1 over 0, 0, 1: 1/7.
        for edge in [out[0], out[2]] {
            assert!((edge - 1.0 / 7.0).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn data_bicubic_reproduces_linear_ramps_inside() {
        let src: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let out = resize(&src, [1, 8], [1, 16], Filter::Bicubic);
        // Output x sits at source coordinate (x + 0.5) / 2 - 0.5; all four taps inside from 3 on.
        for (x, &v) in out.iter().enumerate().take(12).skip(3) {
            let want = (x as f32 + 0.5) / 2.0 - 0.5;
            assert!((v - want).abs() < 1e-5, "x={x}: {v} vs {want}");
        }
    }

    #[test]
    fn data_channel_conversion() {
        let grey = [0.5f32, 1.0];
        assert_eq!(
            convert_channels(&grey, 1, 3),
            vec![0.5, 1.0, 0.5, 1.0, 0.5, 1.0]
        );
        let rgb = [1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0];
        let l = convert_channels(&rgb, 3, 1);
        assert!(
            (l[0] - 0.299).abs() < 1e-6 && (l[1] - 0.587).abs() < 1e-6,
            "{l:?}"
        );
    }

    #[test]
    fn data_batches_resize_after_augmenting_and_before_normalising() {
        let images: Vec<f32> = (0..2 * 2 * 2 * 2).map(|i| i as f32 / 16.0).collect();
        let d = Dataset::new(
            "t",
            [2, 2, 2],
            images,
            vec![0, 1],
            vec!["a".into(), "b".into()],
        )
        .unwrap()
        .with_normalization(vec![0.5, 0.25], vec![0.5, 2.0])
        .unwrap()
        .resized_on_batch(4, 4);
        assert_eq!(d.batch_shape(), [2, 4, 4]);
        let b = d.batch(&[1], None);
        assert_eq!((b.batch, b.channels, b.height, b.width), (1, 2, 4, 4));
        let want = resize(&d.image(1), [2, 2], [4, 4], Filter::Bilinear);
        for (i, (&got, &raw)) in b.images.iter().zip(&want).enumerate() {
            let c = i / 16;
            assert_eq!(got, (raw - d.norm_mean[c]) / d.norm_std[c]);
        }
        // Derived sets keep the resize.
        assert_eq!(d.subset(&[0]).batch_shape(), [2, 4, 4]);
        assert_eq!(d.clone().resized_on_batch(2, 2).batch_shape(), [2, 2, 2]);
    }

    #[test]
    fn data_channel_conversion_keeps_bytes_where_it_can() {
        let names = vec!["a".to_string()];
        let steps = |bytes: Vec<u8>, channels| {
            let shape = [channels, 2, 2];
            let labels = vec![0; bytes.len() / (channels * 4)];
            let images = Pixels::Steps { bytes, levels: 255 };
            Dataset::new("t", shape, images, labels, names.clone()).unwrap()
        };
        // Grey repeated into colour: the same bytes three times over, image by image.
        let grey = steps(vec![0, 51, 102, 255, 1, 2, 3, 4], 1);
        let colour = grey.clone().with_channels(3);
        let want = [[0, 51, 102, 255].repeat(3), [1, 2, 3, 4].repeat(3)].concat();
        assert_eq!(
            colour.images,
            Pixels::Steps {
                bytes: want,
                levels: 255
            }
        );
        // Colour to grey by luma: f32, as converting the f32 pixels gives.
        let rgb = steps((0..24).map(|i| (i * 10) as u8).collect(), 3);
        let luma = rgb.clone().with_channels(1);
        let expected: Vec<f32> = (0..2)
            .flat_map(|i| convert_channels(&rgb.image(i), 3, 1))
            .collect();
        assert_eq!(luma.images, Pixels::F32(expected));
        assert_eq!(luma.shape(), [1, 2, 2]);
    }
}
