"""Calibration and OOD-detection figures of a random ensemble computed by scikit-learn,
torchmetrics and torch, for crates/loren-nn/tests/reference_metrics.rs: loren's metrics on the
same probabilities must give the same figures.

The ensemble's members give f32 softmax probabilities, as loren's models do; every figure here
is computed in f64 from them, on the members' mean (the ensemble's prediction):
  accuracy, ECE (torchmetrics MulticlassCalibrationError, 15 bins, l1), NLL (torch's nll_loss of
  the log mean, the mean clamped below at 1e-12 as loren and much PyTorch code do, so that a
  confident miss costs 27.6 nats, not infinity; some samples here reach the clamp), Brier (summed over classes, averaged over samples), predictive entropy
  (torch.distributions.Categorical), and, with OOD as the positive class and each score turned so
  that higher means more OOD: AUROC (sklearn roc_auc_score), AUPR (sklearn
  average_precision_score) and FPR at 95% TPR (sklearn roc_curve) for -max probability, entropy
  and mutual information. Some OOD samples are exact copies of in-distribution ones, so scores
  tie across the two sets and the tie rules are tested too. And the paper's own ECE
  (prs-eth/LoRA-Ensemble, utils_uncertainty._ECELoss: 10 bins (lower, upper], on the softmax
  of the members' mean logits), as its code computes it.

Run:  python scripts/reference-metrics.py crates/loren-nn/tests/fixtures/reference-metrics
It writes metrics.safetensors: `probs` [M, N, C] and `labels` [N] (as f32) for the labelled set,
`ood_probs` [M, N_ood, C]; the figures are in its metadata, as decimal strings of f64 values.
"""

import sys
from pathlib import Path

import numpy as np
import sklearn
import torch
import torchmetrics
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.classification import MulticlassCalibrationError

MEMBERS, SAMPLES, OOD, CLASSES, COPIES = 4, 600, 400, 7, 60


def paper_ece(member_logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """The LoRA-Ensemble paper's ECE (its utils_uncertainty._ECELoss, which its evaluation feeds
    the members' mean logits): softmax, top-label confidence, bins (lower, upper]."""
    softmaxes = torch.softmax(member_logits.mean(0), dim=1)
    confidences, predictions = torch.max(softmaxes, 1)
    accuracies = predictions.eq(labels)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidences.dtype)
    ece = torch.zeros(1, dtype=confidences.dtype)
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = confidences.gt(lower.item()) * confidences.le(upper.item())
        prop = in_bin.double().mean()
        if prop.item() > 0:
            gap = confidences[in_bin].mean() - accuracies[in_bin].double().mean()
            ece += torch.abs(gap) * prop
    return ece.item()


def ensemble(n: int, sharpness: float, gen: torch.Generator) -> torch.Tensor:
    """[M, n, C] f32 softmax rows: a shared per-sample logit pattern plus member noise, at
    temperatures spread over two orders of magnitude so confidences cover every bin."""
    base = torch.randn((1, n, CLASSES), generator=gen, dtype=torch.float64)
    noise = torch.randn((MEMBERS, n, CLASSES), generator=gen, dtype=torch.float64)
    temp = torch.exp(torch.empty((1, n, 1), dtype=torch.float64).uniform_(-2.5, 2.0, generator=gen))
    logits = sharpness * (base + 0.5 * noise) / temp
    return torch.softmax(logits.float(), dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(probs=p).entropy()


def scores(probs: torch.Tensor) -> dict:
    """Per-sample OOD scores, higher = more OOD."""
    p = probs.double()
    mean = p.mean(0)
    h = entropy(mean)
    mi = (h - entropy(p).mean(0)).clamp(min=0.0)
    return {"max_prob": -mean.max(-1).values, "entropy": h, "mutual_information": mi}


def fpr_at_95(y: np.ndarray, s: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/loren-nn/tests/fixtures/reference-metrics")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(5)
    probs = ensemble(SAMPLES, 1.0, gen)
    mean = probs.double().mean(0)
    # Labels that mostly follow the prediction, so accuracy and calibration are not trivial.
    follow = torch.rand(SAMPLES, generator=gen, dtype=torch.float64) < 0.7
    drawn = torch.multinomial(mean, 1, generator=gen).squeeze(1)
    labels = torch.where(follow, drawn, torch.randint(0, CLASSES, (SAMPLES,), generator=gen))
    ood = ensemble(OOD, 0.6, gen)
    ood[:, :COPIES] = probs[:, :COPIES]  # exact ties between the two sets

    figures = {
        # The members' logits are their log probabilities up to a constant per sample and member.
        "ece_paper": paper_ece(probs.double().log(), labels),
        "accuracy": (mean.argmax(-1) == labels).double().mean().item(),
        "ece": MulticlassCalibrationError(num_classes=CLASSES, n_bins=15, norm="l1")(mean, labels).item(),
        "nll": torch.nn.functional.nll_loss(mean.clamp_min(1e-12).log(), labels).item(),
        "brier": ((mean - torch.nn.functional.one_hot(labels, CLASSES).double()) ** 2).sum(-1).mean().item(),
        "predictive_entropy": entropy(mean).mean().item(),
    }
    s_in, s_ood = scores(probs), scores(ood)
    y = np.concatenate([np.zeros(SAMPLES), np.ones(OOD)])
    for name in s_in:
        s = np.concatenate([s_in[name].numpy(), s_ood[name].numpy()])
        figures[f"{name}.auroc"] = roc_auc_score(y, s)
        figures[f"{name}.aupr"] = average_precision_score(y, s)
        figures[f"{name}.fpr95"] = fpr_at_95(y, s)

    meta = {k: repr(float(v)) for k, v in figures.items()}
    meta.update(
        made_by="scripts/reference-metrics.py",
        torch=torch.__version__,
        sklearn=sklearn.__version__,
        torchmetrics=torchmetrics.__version__,
    )
    tensors = {"probs": probs, "labels": labels.float(), "ood_probs": ood}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "metrics.safetensors", meta)
    floored = int((mean.gather(1, labels[:, None]) < 1e-12).sum())
    print(f"wrote {out}: {figures}; {floored} samples at the NLL clamp")


if __name__ == "__main__":
    main()
