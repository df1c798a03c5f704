//! loren's rotation against torchvision's. `scripts/reference-augment.py` turned a CIFAR-sized
//! image and an odd-sized one by 24 angles with `torchvision.transforms.functional.rotate`
//! (`fixtures/reference-augment/`, versions in the file's metadata): nearest, as the
//! LoRA-Ensemble paper's `RandomRotation((0, 180))` does and `--augment paper` does, and
//! bilinear, as the Rotation shift does. loren's sampler must give the same pixels.

use std::path::PathBuf;

use loren_nn::checkpoint::TensorFile;
use loren_nn::data::affine::{Motion, Sampling, warp};

fn fixture() -> TensorFile {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/reference-augment/rotation.safetensors",
    ]
    .iter()
    .collect();
    TensorFile::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// loren's rotation of image `name` by each angle, beside torchvision's (`{name}_{suffix}`).
fn turned(
    file: &TensorFile,
    name: &str,
    sampling: Sampling,
    suffix: &str,
) -> Vec<(f32, Vec<f32>, Vec<f32>)> {
    let image = file.get(name).unwrap();
    let [c, h, w] = image.shape[..] else {
        panic!("{name} is {:?}", image.shape)
    };
    let theirs = &file.get(&format!("{name}_{suffix}")).unwrap().data;
    let plane = c * h * w;
    file.get("angles")
        .unwrap()
        .data
        .iter()
        .enumerate()
        .map(|(a, &angle)| {
            let mut ours = vec![f32::NAN; plane];
            warp(
                &image.data,
                [c, h, w],
                Motion::rotation(angle),
                sampling,
                &mut ours,
            );
            (angle, ours, theirs[a * plane..(a + 1) * plane].to_vec())
        })
        .collect()
}

/// Nearest sampling picks a pixel, so every pixel must agree. Not checked: the odd image turned
/// by a quarter turn. Its centre is a pixel centre in one axis and halfway between two in the
/// other, so a quarter turn sends every source point exactly halfway between two pixels, and
/// which one a side picks is its f32 rounding (torchvision's normalised grid puts 1.5 at
/// 1.4999999; loren's turn is exact and rounds halves to even). A CIFAR image's centre is
/// halfway in both axes, so its quarter turns land on pixels and are checked.
#[test]
fn nearest_rotation_matches_torchvision_pixel_for_pixel() {
    let file = fixture();
    for name in ["cifar", "odd"] {
        for (angle, ours, theirs) in turned(&file, name, Sampling::Nearest, "nearest") {
            if name == "odd" && angle % 90.0 == 0.0 {
                continue;
            }
            let off: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
            assert!(
                off.is_empty(),
                "{name} turned by {angle}°: {} of {} pixels differ, the first at {}",
                off.len(),
                ours.len(),
                off[0]
            );
        }
    }
}

#[test]
fn bilinear_rotation_matches_torchvision() {
    let file = fixture();
    for name in ["cifar", "odd"] {
        for (angle, ours, theirs) in turned(&file, name, Sampling::Bilinear, "bilinear") {
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .max_by(f32::total_cmp)
                .unwrap_or(0.0);
            // Pixels are in [0, 1]; the weights come from coordinates computed in f32.
            assert!(worst <= 2e-5, "{name} turned by {angle}°: off by {worst:e}");
        }
    }
}
