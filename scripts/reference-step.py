"""Training steps of a LoRA-Ensemble in PyTorch, for crates/loren-nn/tests/reference_step.rs:
loren, started from the same weights on the same batches, must give the same losses, the same
parameters after the steps and the same predictions.

The model and the step are those of benches/pytorch/lora_ensemble_step.py, the PyTorch side of
the CPU speed comparison, with the adapters scaled by s = 2 (the comparison's s = 1 would hide a
misplaced scale): the `tiny` ViT, M members with LoRA on q, k, v and o, the mean
cross-entropy over members and images, global-norm clipping at 1 and AdamW (weight decay on
weight matrices only; here 0.5, far above the comparison's 0.01, to be seen). So this also checks that the two sides of that comparison compute the
same thing. The learning rate follows torch's CosineAnnealingLR over the steps, which is loren's
warmup-cosine schedule with no warmup.

The explicit ensemble gets the same check: M whole ViTs (a smaller one: 8x8x1 images, patch 2,
width 32, depth 2, 2 heads, MLP 64), every weight trained, written here in plain PyTorch from
the definition (pre-norm blocks, exact GELU, class token, final LayerNorm, one head each), with
the same loss, clipping over all members' gradients together, and AdamW.

Run (any recent torch; the version is recorded in each file):
    python scripts/reference-step.py crates/loren-nn/tests/fixtures/reference-step

It writes:
    weights.safetensors  the start, in loren's names: the backbone without a member axis, the
                         adapters `blocks.N.attn.P.lora_{a,b}` [M, r, D] / [M, D, r], the heads
                         `head.weight` [M, C, D] and `head.bias` [M, C]
    steps.safetensors    `images` [S, B, 1, 8, 8], `labels` [S, B] (as f32), `lr` [S], `loss`
                         [S], `grad.NAME` for every trainable tensor's gradient in the first
                         step (after clipping), `after.NAME` for every trainable tensor after
                         the S steps, and `probs` [M, B, C], every member's softmax on the first
                         batch after them
    sgd-steps.safetensors
                         the same for 4 SGD steps (momentum 0.9, L2 decay 0.05) from the same
                         start, the learning rate warming up over 2 steps to 0.5, then a cosine
                         towards 0.05
    explicit-weights.safetensors, explicit-steps.safetensors
                         the same for the explicit ensemble, every tensor with its member axis
                         [M, ...] as loren stacks them
"""

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches" / "pytorch"))
from lora_ensemble_step import CLASSES, DIM, IMAGE, LoraEnsemble, loss_fn  # noqa: E402

MEMBERS, RANK, BATCH, STEPS, LR = 3, 4, 5, 3, 1e-2
# The adapters' scale s in y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ: the speed comparison runs s = 1, where a
# scale applied in the wrong place (or not at all) would not show.
LORA_SCALE = 2.0
# Far above the comparison's 0.01, so that decay on a tensor that should have none (or none on
# one that should) moves its elements by ~1e-3, well clear of rounding.
WEIGHT_DECAY = 0.5
# SGD (momentum, L2 decay) on a schedule with a warmup and a floor: its steps move each element
# in proportion to its gradient, so the moves are compared, not their signs.
SGD_LR, SGD_MIN_LR, SGD_WARMUP, SGD_STEPS, SGD_MOMENTUM, SGD_DECAY = 0.5, 0.05, 2, 4, 0.9, 0.05


class ScaledLoraEnsemble(LoraEnsemble):
    """The speed comparison's model with the adapters' scale s."""

    @staticmethod
    def lora(h, w, b, a, bb):
        return LoraEnsemble.lora(h, w, b, a, LORA_SCALE * bb)


def perturb(model: LoraEnsemble) -> None:
    """Every tensor away from its init: LayerNorm scales near 1, biases and embeddings random,
    and B non-zero, so that the adapters' A gets a gradient from the first step."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("_g"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("_bb"):
                p.copy_(0.02 * noise)
            elif not name.endswith("_a") and not name.startswith("head"):
                fan_in = p.shape[-1] if p.dim() >= 2 else 1
                p.copy_(noise * (0.3 if p.dim() < 2 else 1.5 / math.sqrt(fan_in)))


def loren_names(model: LoraEnsemble) -> dict:
    """The model's tensors under loren's names and shapes (crates/loren-nn/src/vit.rs)."""
    t = {
        "patch_embed.weight": model.patch_w,
        "patch_embed.bias": model.patch_b,
        "cls_token": model.cls.reshape(DIM),
        "pos_embed": model.pos.reshape(-1, DIM),
        "norm.weight": model.ln_g,
        "norm.bias": model.ln_b,
        "head.weight": model.head_w,
        "head.bias": model.head_b,
    }
    for i, blk in enumerate(model.blocks):
        b = f"blocks.{i}"
        for ours, theirs in [("norm1", "ln1"), ("norm2", "ln2")]:
            t[f"{b}.{ours}.weight"], t[f"{b}.{ours}.bias"] = blk[f"{theirs}_g"], blk[f"{theirs}_b"]
        for ours, theirs in [("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]:
            t[f"{b}.{ours}.weight"], t[f"{b}.{ours}.bias"] = blk[f"{theirs}_w"], blk[f"{theirs}_b"]
        for p in "qkvo":
            t[f"{b}.attn.{p}.weight"], t[f"{b}.attn.{p}.bias"] = blk[f"{p}_w"], blk[f"{p}_b"]
            t[f"{b}.attn.{p}.lora_a"], t[f"{b}.attn.{p}.lora_b"] = blk[f"{p}_a"], blk[f"{p}_bb"]
    return t


def trainable(model: LoraEnsemble, named: dict) -> dict:
    ids = {id(p) for p in model.parameters() if p.requires_grad}
    return {k: v for k, v in named.items() if id(v) in ids}


def save(tensors: dict, path: Path, what: str) -> None:
    meta = {"torch": torch.__version__, "made_by": "scripts/reference-step.py", "what": what}
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, path, meta)


def lora_start() -> ScaledLoraEnsemble:
    torch.manual_seed(0)
    model = ScaledLoraEnsemble(MEMBERS, RANK)
    perturb(model)
    return model


def lora_optimizer(model: LoraEnsemble, kind: str) -> torch.optim.Optimizer:
    """As the speed comparison groups them: decay on weight matrices, not on the heads' biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not model.head_b]
    rest = [p for p in params if not any(p is d for d in decay)]
    if kind == "adamw":
        groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=LR)
    groups = [{"params": decay, "weight_decay": SGD_DECAY}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=SGD_LR, momentum=SGD_MOMENTUM)


def run_lora(out: Path, name: str, kind: str, lrs: list) -> None:
    """len(lrs) steps of the LoRA-Ensemble from its start with the learning rates given."""
    model = lora_start()
    named = loren_names(model)
    opt = lora_optimizer(model, kind)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(4)
    images = torch.randn((len(lrs), BATCH, 1, IMAGE, IMAGE), generator=gen)
    labels = torch.randint(0, CLASSES, (len(lrs), BATCH), generator=gen)
    losses, grads = [], {}
    for s, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, images[s], labels[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if s == 0:
            grads = {f"grad.{k}": v.grad.clone() for k, v in trainable(model, named).items()}
        opt.step()
        losses.append(loss.item())

    with torch.no_grad():
        probs = F.softmax(model(images[0]), dim=-1)
    steps = {
        "images": images,
        "labels": labels.float(),
        "lr": torch.tensor(lrs),
        "loss": torch.tensor(losses),
        "probs": probs,
    }
    steps.update(grads)
    steps.update({f"after.{k}": v for k, v in trainable(model, named).items()})
    save(steps, out / name, f"{len(lrs)} {kind} steps from weights.safetensors")
    print(f"{name}: losses {losses}, lr {lrs}")


def warmup_cosine(step: int, base: float, low: float, warmup: int, total: int) -> float:
    """Linear warmup to `base` over `warmup` steps, then a cosine to `low` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return low + (base - low) * 0.5 * (1.0 + math.cos(math.pi * t))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/loren-nn/tests/fixtures/reference-step")
    out.mkdir(parents=True, exist_ok=True)
    save(loren_names(lora_start()), out / "weights.safetensors", "the start, in loren's names")
    # AdamW on torch's own CosineAnnealingLR, which is loren's schedule with no warmup.
    model = lora_start()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(lora_optimizer(model, "adamw"), T_max=STEPS)
    lrs = []
    for _ in range(STEPS):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    run_lora(out, "steps.safetensors", "adamw", lrs)
    # SGD with momentum and L2 decay, on a warmup and a cosine that ends above 0.
    sgd = [warmup_cosine(s, SGD_LR, SGD_MIN_LR, SGD_WARMUP, SGD_STEPS) for s in range(SGD_STEPS)]
    run_lora(out, "sgd-steps.safetensors", "sgd", sgd)
    print(f"torch {torch.__version__}")
    explicit(out)

# The explicit ensemble's ViT: small, so that M full copies stay a small fixture.
E_IMAGE, E_PATCH, E_DIM, E_DEPTH, E_HEADS, E_MLP, E_MEMBERS, E_BATCH = 8, 2, 32, 2, 2, 64, 2, 4
E_TOKENS = (E_IMAGE // E_PATCH) ** 2 + 1


def explicit_start(gen: torch.Generator) -> dict:
    """Every member's tensors under loren's names, [M, ...]: random, LayerNorm scales near 1."""
    m, d, f = E_MEMBERS, E_DIM, E_PATCH * E_PATCH

    def rand(*shape, scale):
        return (scale * torch.randn((m, *shape), generator=gen)).requires_grad_()

    t = {
        "patch_embed.weight": rand(d, f, scale=1.5 / math.sqrt(f)),
        "patch_embed.bias": rand(d, scale=0.3),
        "cls_token": rand(d, scale=0.3),
        "pos_embed": rand(E_TOKENS, d, scale=0.3),
        "norm.weight": (1.0 + 0.2 * torch.randn((m, d), generator=gen)).requires_grad_(),
        "norm.bias": rand(d, scale=0.3),
        "head.weight": rand(CLASSES, d, scale=1.0 / math.sqrt(d)),
        "head.bias": rand(CLASSES, scale=0.3),
    }
    for i in range(E_DEPTH):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            t[f"{b}.{norm}.weight"] = (1.0 + 0.2 * torch.randn((m, d), generator=gen)).requires_grad_()
            t[f"{b}.{norm}.bias"] = rand(d, scale=0.3)
        for name, out, inp in [("attn.q", d, d), ("attn.k", d, d), ("attn.v", d, d),
                               ("attn.o", d, d), ("mlp.fc1", E_MLP, d), ("mlp.fc2", d, E_MLP)]:
            t[f"{b}.{name}.weight"] = rand(out, inp, scale=1.5 / math.sqrt(inp))
            t[f"{b}.{name}.bias"] = rand(out, scale=0.3)
    return t


def explicit_forward(t: dict, images: torch.Tensor) -> torch.Tensor:
    """Logits [M, B, C] of M separate ViTs on the same images [B, 1, H, W]."""
    m, b, g, p, d = E_MEMBERS, images.shape[0], E_IMAGE // E_PATCH, E_PATCH, E_DIM

    def linear(x, name):  # x [M, N, in], one weight per member
        return torch.baddbmm(t[f"{name}.bias"].unsqueeze(1), x, t[f"{name}.weight"].transpose(1, 2))

    def norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * t[f"{name}.weight"].unsqueeze(1) + t[f"{name}.bias"].unsqueeze(1)

    patches = images.reshape(b, 1, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(1, b * g * g, p * p)
    x = linear(patches.expand(m, -1, -1), "patch_embed").reshape(m, b, g * g, d)
    cls = t["cls_token"].reshape(m, 1, 1, d).expand(m, b, 1, d)
    x = (torch.cat([cls, x], 2) + t["pos_embed"].unsqueeze(1)).reshape(m, b * E_TOKENS, d)
    heads = lambda y: y.reshape(m * b, E_TOKENS, E_HEADS, d // E_HEADS).transpose(1, 2)
    for i in range(E_DEPTH):
        blk = f"blocks.{i}"
        h = norm(x, f"{blk}.norm1")
        q, k, v = (heads(linear(h, f"{blk}.attn.{n}")) for n in "qkv")
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(m, b * E_TOKENS, d)
        x = x + linear(a, f"{blk}.attn.o")
        h = F.gelu(linear(norm(x, f"{blk}.norm2"), f"{blk}.mlp.fc1"))
        x = x + linear(h, f"{blk}.mlp.fc2")
    c = norm(x.reshape(m, b, E_TOKENS, d)[:, :, 0], "norm")
    return linear(c, "head")


def explicit(out: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    t = explicit_start(gen)
    save(t, out / "explicit-weights.safetensors", "the explicit ensemble's start, in loren's names")
    images = torch.randn((STEPS, E_BATCH, 1, E_IMAGE, E_IMAGE), generator=gen)
    labels = torch.randint(0, CLASSES, (STEPS, E_BATCH), generator=gen)
    # Decay on the weight matrices (patch embedding, projections, MLP, heads), not on biases,
    # LayerNorms, the class token or the position embeddings.
    matrices = {n for n in t if n.endswith(".weight") and "norm" not in n}
    opt = torch.optim.AdamW(
        [{"params": [t[n] for n in t if n in matrices], "weight_decay": WEIGHT_DECAY},
         {"params": [t[n] for n in t if n not in matrices], "weight_decay": 0.0}],
        lr=LR,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=0.0)
    lrs, losses, grads = [], [], {}
    for s in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        logits = explicit_forward(t, images[s])
        loss = F.cross_entropy(logits.reshape(-1, CLASSES), labels[s].repeat(E_MEMBERS))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(t.values()), 1.0)
        if s == 0:
            grads = {f"grad.{k}": v.grad.clone() for k, v in t.items()}
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        probs = F.softmax(explicit_forward(t, images[0]), dim=-1)
    steps = {"images": images, "labels": labels.float(), "lr": torch.tensor(lrs),
             "loss": torch.tensor(losses), "probs": probs}
    steps.update(grads)
    steps.update({f"after.{k}": v for k, v in t.items()})
    save(steps, out / "explicit-steps.safetensors", f"{STEPS} AdamW steps of the explicit ensemble")
    print(f"explicit: losses {losses}")


if __name__ == "__main__":
    main()
