//! Position embeddings for another image size: the patch grid resampled, the class token kept.

use crate::data::resize::{Filter, resize};

/// `pos` (`[1 + n², dim]`: the class token's row, then an `n × n` patch grid row by row)
/// resampled to a `grid × grid` patch grid by antialiased bicubic interpolation, as timm's
/// `resample_abs_pos_embed` does. The class token's row is copied unchanged.
///
/// Errors when the rows after the class token do not form a square grid.
pub fn resample_pos_embed(pos: &[f32], dim: usize, grid: usize) -> Result<Vec<f32>, String> {
    let rows = pos.len() / dim;
    let side = square_side(rows.saturating_sub(1)).ok_or_else(|| {
        format!("{rows} position embeddings are not a class token plus a square patch grid")
    })?;
    let (cls, patches) = pos.split_at(dim);
    // [n·n, D] → [D, n, n], so each embedding dimension is one image plane.
    let planes = transpose(patches, side * side, dim);
    let resized = resize(&planes, [side, side], [grid, grid], Filter::Bicubic);
    let mut out = cls.to_vec();
    out.extend(transpose(&resized, dim, grid * grid));
    Ok(out)
}

/// `n` with `n² = x`, `n ≥ 1`.
fn square_side(x: usize) -> Option<usize> {
    let n = (x as f64).sqrt().round() as usize;
    (n >= 1 && n * n == x).then_some(n)
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_pos_embed_same_grid_is_unchanged_and_class_token_kept() {
        let dim = 3;
        let pos: Vec<f32> = (0..(1 + 16) * dim)
            .map(|i| (i as f32 * 0.7).cos())
            .collect();
        assert_eq!(resample_pos_embed(&pos, dim, 4).unwrap(), pos);
        let out = resample_pos_embed(&pos, dim, 7).unwrap();
        assert_eq!(out.len(), (1 + 49) * dim);
        assert_eq!(&out[..dim], &pos[..dim]);
    }

    #[test]
    fn import_pos_embed_interpolates_each_dimension_as_a_plane() {
        // Dimension 0 is constant, dimension 1 a ramp along x: enlarging keeps the constant and
        // (away from the edges) the ramp.
        let (n, g, dim) = (4, 8, 2);
        let mut pos = vec![9.0, 9.0];
        for _y in 0..n {
            for x in 0..n {
                pos.extend([0.5, x as f32]);
            }
        }
        let out = resample_pos_embed(&pos, dim, g).unwrap();
        for y in 0..g {
            for x in 0..g {
                let row = &out[(1 + y * g + x) * dim..][..dim];
                assert!((row[0] - 0.5).abs() < 1e-6);
                if (3..5).contains(&x) {
                    let want = (x as f32 + 0.5) / 2.0 - 0.5;
                    assert!((row[1] - want).abs() < 1e-5, "x={x}: {}", row[1]);
                }
            }
        }
        let e = resample_pos_embed(&pos[..dim * 6], dim, 2).unwrap_err();
        assert!(e.contains("6 position embeddings"), "{e}");
    }
}
