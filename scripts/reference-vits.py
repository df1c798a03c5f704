"""Small ViTs built by timm, torchvision and Hugging Face transformers themselves, with their
logits on fixed inputs, for crates/loren-nn/tests/reference_vits.rs: loren imports each library's
weights and must give the library's own logits. The importer's naming tests write files by the
documented names; this checks the numbers against the real model code, so a wrong qkv split,
patch flattening order, LayerNorm epsilon, GELU or position-embedding resampling shows up here.

Run (any recent torch, timm and transformers; the versions are recorded in each file):
    python scripts/reference-vits.py crates/loren-nn/tests/fixtures/reference-vits

It writes, per library L in timm, torchvision, hf:
    L.safetensors      the weights exactly as the library saves them: the state_dict for timm and
                       torchvision, `save_pretrained`'s model.safetensors for hf (the hub's names;
                       hf-state-dict.safetensors holds transformers 5's renamed state_dict)
    L-io.safetensors   `images` [B, 3, 16, 16] (already normalised), `logits` [B, C] from the
                       library's forward, and the classifier as `head.weight` [C, D] and
                       `head.bias` [C] (loren's importer drops pretrained heads)
and for timm at other image sizes S (timm-S-io.safetensors): images of S pixels and the logits
of timm's model built for S, its position embeddings resampled by timm's
`resample_abs_pos_embed` from the 16-pixel checkpoint, as timm does when loading it.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torchvision
import transformers
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

IMAGE, PATCH, DIM, DEPTH, HEADS, MLP, CLASSES, BATCH = 16, 4, 32, 2, 2, 64, 5, 3
OTHER_SIZES = (24, 12)  # a finer and a coarser patch grid than the checkpoint's 4 x 4
# Parameter names (all three libraries) of the patch, class-token and position embeddings.
EMBEDDINGS = ("patch_embed", "patch_embeddings", "conv_proj", "cls_token", "class_token",
              "pos_embed", "pos_embedding", "position_embeddings")

VERSIONS = {
    "torch": torch.__version__,
    "timm": timm.__version__,
    "torchvision": torchvision.__version__,
    "transformers": transformers.__version__,
}


def is_layernorm(name: str) -> bool:
    """timm's norm1/norm2/norm, transformers' layernorm*, torchvision's ln_1/ln_2/encoder.ln."""
    parts = name.lower().split(".")
    return any("norm" in p or p in ("ln", "ln_1", "ln_2") for p in parts)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and away from its init (LayerNorm scales near 1, not 1; biases,
    class token and position embeddings far from 0), so no tensor can be misplaced unseen."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if is_layernorm(name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                fan_in = p.shape[-1] if p.dim() >= 2 else 1
                scale = 0.5 if p.dim() < 2 else (1.0 / fan_in) ** 0.5 * 1.5
                if p.dim() == 4:  # the patch convolution: fan-in is channels x patch x patch
                    scale = (1.0 / p[0].numel()) ** 0.5 * 1.5
                p.copy_(scale * noise)
        # Small tokens: the first LayerNorm's input then has a variance near 1e-4, where its
        # epsilon (1e-6 for timm and torchvision, 1e-12 for transformers) moves the output by
        # about 0.5%, so running with another library's epsilon fails the comparison.
        for name, p in model.named_parameters():
            if any(k in name for k in EMBEDDINGS):
                p.mul_(0.01)


def images(size: int, seed: int) -> torch.Tensor:
    return torch.randn((BATCH, 3, size, size), generator=torch.Generator().manual_seed(seed))


def timm_model(size: int) -> torch.nn.Module:
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=size,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / DIM,
        num_classes=CLASSES,
    )


def torchvision_model() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=IMAGE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=DIM,
        mlp_dim=MLP,
        num_classes=CLASSES,
    )


def hf_model() -> torch.nn.Module:
    config = transformers.ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        num_labels=CLASSES,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(config)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).contiguous()


def write(out: Path, name: str, tensors: dict, what: str) -> None:
    meta = dict(VERSIONS, made_by="scripts/reference-vits.py", what=what)
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, out / name, meta)


def save_pretrained(model: torch.nn.Module, path: Path) -> None:
    """The model file `save_pretrained` writes, which is what the hub holds."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(Path(tmp) / "model.safetensors", path)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/loren-nn/tests/fixtures/reference-vits")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x = images(IMAGE, 1)
    libraries = {
        "timm": (timm_model(IMAGE), "head"),
        "torchvision": (torchvision_model(), "heads.head"),
        "hf": (hf_model(), "classifier"),
    }
    for seed, (lib, (model, head)) in enumerate(libraries.items(), start=10):
        model.eval()
        perturb(model, seed)
        state = model.state_dict()
        if lib == "hf":
            save_pretrained(model, out / "hf.safetensors")
            write(out, "hf-state-dict.safetensors", state, "hf ViT state_dict")
        else:
            write(out, f"{lib}.safetensors", state, f"{lib} ViT state_dict")
        io = {
            "images": x,
            "logits": logits(model, x),
            "head.weight": state[f"{head}.weight"],
            "head.bias": state[f"{head}.bias"],
        }
        write(out, f"{lib}-io.safetensors", io, f"{lib} forward on `images`")

    # timm at other sizes: the 16-pixel checkpoint loaded as timm loads it into a model for S.
    state = libraries["timm"][0].state_dict()
    for size in OTHER_SIZES:
        model = timm_model(size).eval()
        grid = size // PATCH
        moved = dict(state)
        moved["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=(grid, grid), num_prefix_tokens=1
        )
        model.load_state_dict(moved)
        xs = images(size, 2)
        io = {"images": xs, "logits": logits(model, xs)}
        write(out, f"timm-{size}-io.safetensors", io, f"timm forward at {size} pixels")
    print(f"wrote {out} with {VERSIONS}")


if __name__ == "__main__":
    main()
