"""Images turned by torchvision's rotation, for crates/loren-nn/tests/reference_augment.rs:
loren's sampler must turn the same images into the same pixels.

The LoRA-Ensemble paper's CIFAR augmentation (prs-eth/LoRA-Ensemble,
data/data_augmentation.py) runs `transforms.RandomRotation(degrees=(0, 180))` on the image
tensor, which calls `torchvision.transforms.functional.rotate(img, angle)` with its defaults:
nearest sampling, the image centre, no expansion, zero fill. `loren train --augment paper`
samples its rotation the same way (affine::Sampling::Nearest); the Rotation shift of the test
set samples bilinearly, which torchvision does with `interpolation=BILINEAR`. Both are checked.

Run (any recent torch and torchvision; the versions are recorded in the file):
    python scripts/reference-augment.py crates/loren-nn/tests/fixtures/reference-augment

It writes rotation.safetensors:
    angles            [A] in degrees, counter-clockwise as torchvision and loren both count them
    cifar             [3, 32, 32] CIFAR-sized pixels on the 0..1 scale (bytes / 255)
    cifar_nearest     [A, 3, 32, 32] torchvision's nearest rotation of `cifar` by each angle
    cifar_bilinear    [A, 3, 32, 32] the same, bilinear
    odd, odd_nearest, odd_bilinear
                      the same for a [2, 7, 10] image, whose centre falls on a pixel in one axis
                      and between two in the other
"""

import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F


def rotated(image: torch.Tensor, angles: list[float], mode: InterpolationMode) -> torch.Tensor:
    return torch.stack([F.rotate(image, a, interpolation=mode) for a in angles])


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(20261205)
    # Whole turns, the paper's range and beyond it, and angles no simpler than they need be.
    angles = [0.0, 90.0, 180.0, -90.0, 45.0, 30.0, 179.5, 0.25]
    angles += (torch.rand(16, generator=g, dtype=torch.float64) * 360 - 180).tolist()
    # f32, as loren draws them, so both sides turn by the same angle.
    angles = torch.tensor(angles, dtype=torch.float32).tolist()
    cifar = torch.randint(0, 256, (3, 32, 32), generator=g).float() / 255
    odd = torch.rand(2, 7, 10, generator=g)
    tensors = {"angles": torch.tensor(angles, dtype=torch.float32), "cifar": cifar, "odd": odd}
    for name, image in [("cifar", cifar), ("odd", odd)]:
        tensors[f"{name}_nearest"] = rotated(image, angles, InterpolationMode.NEAREST)
        tensors[f"{name}_bilinear"] = rotated(image, angles, InterpolationMode.BILINEAR)
    # RandomRotation with the paper's arguments is rotate() with these defaults.
    torch.manual_seed(0)
    picked = torchvision.transforms.RandomRotation(degrees=(0, 180))(cifar)
    torch.manual_seed(0)
    angle = float(torch.empty(1).uniform_(0.0, 180.0).item())
    assert torch.equal(picked, F.rotate(cifar, angle)), "RandomRotation is rotate(img, angle)"
    assert torch.equal(F.rotate(cifar, angle), F.rotate(cifar, angle, InterpolationMode.NEAREST))
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, torchvision=torchvision.__version__)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "rotation.safetensors", meta)
    print(f"wrote {out / 'rotation.safetensors'} ({len(angles)} angles)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/loren-nn/tests/fixtures/reference-augment"))
