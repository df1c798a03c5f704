"""The same LoRA-Ensemble training step as `loren bench`, written as well as eager PyTorch allows,
timed on the same machine, so loren's CPU step is compared with PyTorch side by side.

What one step does, as loren does it (crates/loren-nn/src/vit.rs, src/bench.rs):
  - ViT `tiny` (8x8x1 images, patch 2, 17 tokens, width 64, depth 4, 4 heads, MLP 128, LN eps 1e-6);
  - M members, LoRA rank r on q, k, v and o (scale 1), one head per member; the backbone frozen;
  - the part before the first adapted projection computed once for all members (patch and token
    embedding, the first LayerNorm), the shared-W products as one matmul over all members' rows;
  - loss: mean cross-entropy over members and images; backward; global-norm clipping at 1;
    AdamW (lr 1e-4, weight decay 0.01 on weight matrices only).

Variants timed (the best is the comparison point):
  eager          the step above, eager mode, fused AdamW;
  compiled       the forward and loss through torch.compile (inductor's C++ backend), backward
                 through AOTAutograd, fused AdamW.

Run:  python benches/pytorch/lora_ensemble_step.py [--members 16] [--batch 32] [--threads 2]
It prints the median and the spread of the timed steps, per variant, and writes JSON with --json.
"""

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 64, 4, 4, 128, 2, 8, 10
TOKENS = (IMAGE // PATCH) ** 2 + 1


class LoraEnsemble(torch.nn.Module):
    def __init__(self, members, rank, gain=10.0):
        super().__init__()
        self.m, self.r = members, rank

        def frozen(*shape, std=0.02):
            return torch.nn.Parameter(torch.randn(*shape) * std, requires_grad=False)

        def ones(n):
            return torch.nn.Parameter(torch.ones(n), requires_grad=False)

        self.patch_w, self.patch_b = frozen(DIM, PATCH * PATCH), frozen(DIM)
        self.cls, self.pos = frozen(1, 1, DIM), frozen(1, TOKENS, DIM)
        self.blocks = []
        for i in range(DEPTH):
            blk = {
                "ln1_g": ones(DIM), "ln1_b": frozen(DIM),
                "ln2_g": ones(DIM), "ln2_b": frozen(DIM),
                "fc1_w": frozen(MLP, DIM), "fc1_b": frozen(MLP),
                "fc2_w": frozen(DIM, MLP), "fc2_b": frozen(DIM),
            }
            for p in "qkvo":
                blk[f"{p}_w"], blk[f"{p}_b"] = frozen(DIM, DIM), frozen(DIM)
                bound = gain * math.sqrt(6.0 / (DIM + rank))
                blk[f"{p}_a"] = torch.nn.Parameter(torch.empty(members, rank, DIM).uniform_(-bound, bound))
                blk[f"{p}_bb"] = torch.nn.Parameter(torch.zeros(members, DIM, rank))
            for k, v in blk.items():
                self.register_parameter(f"b{i}_{k}", v)
            self.blocks.append(blk)
        self.ln_g, self.ln_b = ones(DIM), frozen(DIM)
        bound = 1.0 / math.sqrt(DIM)
        self.head_w = torch.nn.Parameter(torch.empty(members, CLASSES, DIM).uniform_(-bound, bound))
        self.head_b = torch.nn.Parameter(torch.empty(members, CLASSES).uniform_(-bound, bound))

    @staticmethod
    def lora(h, w, b, a, bb):
        # h [G, N, D] with G = 1 (shared prefix) or M; one shared-W matmul over all rows.
        g, n, d = h.shape
        y = torch.addmm(b, h.reshape(g * n, d), w.t()).reshape(g, n, -1)
        u = torch.matmul(h, a.transpose(1, 2))            # [M, N, r] (broadcast over G = 1)
        return torch.baddbmm(y.expand(a.shape[0], n, -1), u, bb.transpose(1, 2))

    def forward(self, images):
        b = images.shape[0]
        p = images.reshape(b, 1, IMAGE // PATCH, PATCH, IMAGE // PATCH, PATCH)
        p = p.permute(0, 2, 4, 1, 3, 5).reshape(b, -1, PATCH * PATCH)
        x = F.linear(p, self.patch_w, self.patch_b)
        x = torch.cat([self.cls.expand(b, 1, DIM), x], 1) + self.pos
        x = x.reshape(1, b * TOKENS, DIM)                  # the shared prefix: G = 1
        for blk in self.blocks:
            h = F.layer_norm(x, (DIM,), blk["ln1_g"], blk["ln1_b"], 1e-6)
            q, k, v = (self.lora(h, blk[f"{p}_w"], blk[f"{p}_b"], blk[f"{p}_a"], blk[f"{p}_bb"]) for p in "qkv")
            heads = lambda t: t.reshape(self.m * b, TOKENS, HEADS, DIM // HEADS).transpose(1, 2)
            a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
            a = a.transpose(1, 2).reshape(self.m, b * TOKENS, DIM)
            x = x + self.lora(a, blk["o_w"], blk["o_b"], blk["o_a"], blk["o_bb"])
            h = F.layer_norm(x, (DIM,), blk["ln2_g"], blk["ln2_b"], 1e-6)
            h = F.gelu(F.linear(h, blk["fc1_w"], blk["fc1_b"]))
            x = x + F.linear(h, blk["fc2_w"], blk["fc2_b"])
        c = x.reshape(self.m, b, TOKENS, DIM)[:, :, 0]
        c = F.layer_norm(c, (DIM,), self.ln_g, self.ln_b, 1e-6)
        return torch.baddbmm(self.head_b.unsqueeze(1), c, self.head_w.transpose(1, 2))  # [M, B, C]


def loss_fn(model, images, targets):
    logits = model(images)
    return F.cross_entropy(logits.reshape(-1, CLASSES), targets.repeat(model.m))


def time_variant(name, members, batch, rank, warmup, repeats, seed):
    torch.manual_seed(seed)
    model = LoraEnsemble(members, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not model.head_b]
    rest = [p for p in params if not any(p is d for d in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-4, fused=True,
    )
    images = torch.randn(batch, 1, IMAGE, IMAGE)
    targets = torch.randint(0, CLASSES, (batch,))
    fwd = torch.compile(loss_fn) if name == "compiled" else loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd(model, images, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {
        "variant": name,
        "median_ms": statistics.median(samples),
        "min_ms": samples[0],
        "max_ms": samples[-1],
        "repeats": repeats,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--variants", default="eager,compiled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.variants.split(","):
        r = time_variant(name, a.members, a.batch, a.rank, a.warmup, a.repeats, a.seed)
        rows.append(r)
        print(f"pytorch {name:9s} tiny M={a.members} B={a.batch} r={a.rank}: "
              f"median {r['median_ms']:.1f} ms ({r['min_ms']:.1f}-{r['max_ms']:.1f}) over {r['repeats']} steps")
    if a.json:
        info = {
            "torch": torch.__version__, "threads": a.threads, "cpu": platform.processor() or platform.machine(),
            "members": a.members, "batch": a.batch, "rank": a.rank, "rows": rows,
        }
        with open(a.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
