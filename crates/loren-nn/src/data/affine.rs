//! The one geometric sampler: rotation about the image centre plus translation, bilinear or
//! nearest, with zero fill. Augmentation and the Rotation shift both use it, so they cannot
//! drift apart.

/// A rigid motion of the image plane.
///
/// `angle_deg > 0` turns the picture counter-clockwise as displayed (row 0 at the top);
/// `(tx, ty)` moves it right and down, in pixels. Rotation is about the centre
/// `((W-1)/2, (H-1)/2)`, so a quarter turn of a square image maps pixels onto pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Motion {
    pub angle_deg: f32,
    pub tx: f32,
    pub ty: f32,
}

impl Motion {
    pub fn rotation(angle_deg: f32) -> Motion {
        Motion {
            angle_deg,
            ..Motion::default()
        }
    }

    pub fn is_identity(&self) -> bool {
        self.angle_deg == 0.0 && self.tx == 0.0 && self.ty == 0.0
    }
}

/// How [`warp`] reads the source image where an output pixel's source falls between pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// The four pixels around, weighted by nearness: smooth edges.
    #[default]
    Bilinear,
    /// The nearest pixel, a half rounding to even: what torchvision's rotation of a tensor does
    /// with its default `InterpolationMode.NEAREST` (grid_sample rounds with `nearbyint`).
    Nearest,
}

/// Writes `src` (`[C, H, W]`) moved by `motion` into `dst`, sampling as `sampling` says; pixels
/// whose source falls outside the image read as zero.
///
/// Each output pixel pulls from the inverse motion, so there are no holes.
pub fn warp(src: &[f32], shape: [usize; 3], motion: Motion, sampling: Sampling, dst: &mut [f32]) {
    let [channels, h, w] = shape;
    let plane = h * w;
    debug_assert_eq!(src.len(), channels * plane);
    debug_assert_eq!(dst.len(), channels * plane);
    if motion.is_identity() {
        dst.copy_from_slice(src);
        return;
    }
    let (sin, cos) = sin_cos_degrees(motion.angle_deg);
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    for y in 0..h {
        for x in 0..w {
            let dx = x as f32 - cx - motion.tx;
            let dy = y as f32 - cy - motion.ty;
            // The inverse of a counter-clockwise turn in y-down coordinates.
            let sx = cos * dx - sin * dy + cx;
            let sy = sin * dx + cos * dy + cy;
            for c in 0..channels {
                let plane_src = &src[c * plane..(c + 1) * plane];
                dst[c * plane + y * w + x] = match sampling {
                    Sampling::Bilinear => bilinear(plane_src, h, w, sx, sy),
                    Sampling::Nearest => nearest(plane_src, h, w, sx, sy),
                };
            }
        }
    }
}

/// The sine and cosine of `angle_deg` degrees, exact at whole quarter turns: there a turn
/// maps pixel centres onto pixel centres, or onto the exact midpoints that nearest sampling
/// rounds to even, and `90f32.to_radians().cos()` (-4.4e-8, not 0) would move them. Other
/// angles take f32's own, as before quarter turns were made exact, so runs stay as they were.
fn sin_cos_degrees(angle_deg: f32) -> (f32, f32) {
    if angle_deg % 90.0 != 0.0 {
        return angle_deg.to_radians().sin_cos();
    }
    match (angle_deg / 90.0).rem_euclid(4.0) as u8 {
        0 => (0.0, 1.0),
        1 => (1.0, 0.0),
        2 => (0.0, -1.0),
        _ => (-1.0, 0.0),
    }
}

/// The pixel at `(x, y)` of one `[H, W]` plane, or zero outside it.
fn pixel_or_zero(plane: &[f32], h: usize, w: usize, x: i64, y: i64) -> f32 {
    if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
        0.0
    } else {
        plane[y as usize * w + x as usize]
    }
}

/// Bilinear sample of one `[H, W]` plane at `(sx, sy)`, with zero outside.
fn bilinear(plane: &[f32], h: usize, w: usize, sx: f32, sy: f32) -> f32 {
    let (x0, y0) = (sx.floor(), sy.floor());
    let (fx, fy) = (sx - x0, sy - y0);
    // A saturating cast: NaN or huge coordinates land outside the image and read as zero.
    let (x0, y0) = (x0 as i64, y0 as i64);
    let at = |x: i64, y: i64| pixel_or_zero(plane, h, w, x, y);
    let top = at(x0, y0) * (1.0 - fx) + at(x0.saturating_add(1), y0) * fx;
    let y1 = y0.saturating_add(1);
    let bottom = at(x0, y1) * (1.0 - fx) + at(x0.saturating_add(1), y1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// The pixel of one `[H, W]` plane nearest `(sx, sy)`, with zero outside.
fn nearest(plane: &[f32], h: usize, w: usize, sx: f32, sy: f32) -> f32 {
    if !(sx.is_finite() && sy.is_finite()) {
        return 0.0;
    }
    // Saturating casts: huge coordinates land outside the image.
    let (x, y) = (sx.round_ties_even() as i64, sy.round_ties_even() as i64);
    pixel_or_zero(plane, h, w, x, y)
}

/// Mirrors each row of `[C, H, W]` in place (left ↔ right).
pub fn flip_horizontal(image: &mut [f32], shape: [usize; 3]) {
    let w = shape[2];
    image.chunks_exact_mut(w).for_each(|row| row.reverse());
}

/// Mirrors each plane of `[C, H, W]` top ↔ bottom, in place.
pub fn flip_vertical(image: &mut [f32], shape: [usize; 3]) {
    let [_, h, w] = shape;
    for plane in image.chunks_exact_mut(h * w) {
        for y in 0..h / 2 {
            let (top, bottom) = plane.split_at_mut((h - 1 - y) * w);
            top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8×8 image whose every pixel differs, so any mis-mapped pixel shows.
    fn asymmetric(channels: usize) -> Vec<f32> {
        (0..channels * 64)
            .map(|i| i as f32 / (channels * 64) as f32)
            .collect()
    }

    fn warped(src: &[f32], shape: [usize; 3], motion: Motion) -> Vec<f32> {
        sampled(src, shape, motion, Sampling::Bilinear)
    }

    fn sampled(src: &[f32], shape: [usize; 3], motion: Motion, sampling: Sampling) -> Vec<f32> {
        let mut dst = vec![f32::NAN; src.len()];
        warp(src, shape, motion, sampling, &mut dst);
        dst
    }

    #[test]
    fn data_rotation_by_90_degrees_matches_a_hand_rotated_copy() {
        let n = 8;
        let shape = [2, n, n];
        let src = asymmetric(2);
        // Counter-clockwise: the right-hand column becomes the top row.
        let mut ccw = vec![0.0; src.len()];
        let mut cw = vec![0.0; src.len()];
        for c in 0..2 {
            for r in 0..n {
                for col in 0..n {
                    ccw[c * 64 + r * n + col] = src[c * 64 + col * n + (n - 1 - r)];
                    cw[c * 64 + r * n + col] = src[c * 64 + (n - 1 - col) * n + r];
                }
            }
        }
        // Exactly: a quarter turn maps pixel centres onto pixel centres.
        assert_eq!(warped(&src, shape, Motion::rotation(90.0)), ccw);
        assert_eq!(warped(&src, shape, Motion::rotation(-90.0)), cw);
        assert_eq!(warped(&src, shape, Motion::rotation(450.0)), ccw);
        let mut four = src.clone();
        for _ in 0..4 {
            four = warped(&four, shape, Motion::rotation(90.0));
        }
        assert_eq!(four, src);
        let nearest = |angle| sampled(&src, shape, Motion::rotation(angle), Sampling::Nearest);
        assert_eq!(nearest(90.0), ccw);
        assert_eq!(nearest(-90.0), cw);
    }

    #[test]
    fn data_nearest_sampling_takes_whole_pixels_and_rounds_halves_to_even() {
        let shape = [1, 8, 8];
        let src = asymmetric(1);
        let moved = |tx: f32| {
            sampled(
                &src,
                shape,
                Motion {
                    tx,
                    ..Motion::default()
                },
                Sampling::Nearest,
            )
        };
        // Output column x reads source column x - tx: x - 0.4 rounds to x, x - 0.6 to x - 1.
        assert_eq!(moved(0.4), src);
        assert_eq!(moved(0.6), moved(1.0));
        // x - 0.5 ties: to the even one of x - 1 and x.
        let half = moved(0.5);
        for (x, &got) in half.iter().enumerate().take(8).skip(1) {
            let even = if x % 2 == 0 { x } else { x - 1 };
            assert_eq!(got, src[even], "column {x}");
        }
        assert_eq!(half[0], src[0]);
        // Every output pixel is a source pixel or the zero fill.
        let turned = sampled(&src, shape, Motion::rotation(33.0), Sampling::Nearest);
        assert!(turned.iter().all(|p| *p == 0.0 || src.contains(p)));
        assert_ne!(turned, warped(&src, shape, Motion::rotation(33.0)));
    }

    #[test]
    fn data_translation_shifts_whole_pixels_with_zero_fill() {
        let shape = [1, 8, 8];
        let src = asymmetric(1);
        let moved = warped(
            &src,
            shape,
            Motion {
                angle_deg: 0.0,
                tx: 1.0,
                ty: -2.0,
            },
        );
        for y in 0..8 {
            for x in 0..8 {
                let (sx, sy) = (x as i64 - 1, y as i64 + 2);
                let want = if sx < 0 || sy > 7 {
                    0.0
                } else {
                    src[sy as usize * 8 + sx as usize]
                };
                assert!((moved[y * 8 + x] - want).abs() < 1e-6, "({x},{y})");
            }
        }
        // Half a pixel averages the two neighbours.
        let half = warped(
            &src,
            shape,
            Motion {
                tx: 0.5,
                ..Motion::default()
            },
        );
        assert!((half[9] - (src[8] + src[9]) / 2.0).abs() < 1e-6);
        assert_eq!(warped(&src, shape, Motion::default()), src);
    }

    #[test]
    fn data_warp_with_nonfinite_motion_does_not_panic() {
        let src = asymmetric(1);
        for angle in [f32::NAN, f32::INFINITY, 1e30] {
            for sampling in [Sampling::Bilinear, Sampling::Nearest] {
                let out = sampled(&src, [1, 8, 8], Motion::rotation(angle), sampling);
                assert_eq!(out.len(), 64);
            }
        }
        let far = warped(
            &src,
            [1, 8, 8],
            Motion {
                tx: 1e20,
                ..Motion::default()
            },
        );
        assert!(far.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn data_flips_mirror_rows_and_planes() {
        let shape = [2, 3, 4];
        let src: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let mut h = src.clone();
        flip_horizontal(&mut h, shape);
        let mut v = src.clone();
        flip_vertical(&mut v, shape);
        for c in 0..2 {
            for y in 0..3 {
                for x in 0..4 {
                    let at = |y: usize, x: usize| src[c * 12 + y * 4 + x];
                    assert_eq!(h[c * 12 + y * 4 + x], at(y, 3 - x));
                    assert_eq!(v[c * 12 + y * 4 + x], at(2 - y, x));
                }
            }
        }
    }
}
