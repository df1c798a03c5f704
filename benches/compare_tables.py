#!/usr/bin/env python3
"""The README's comparison figures from `loren compare` outputs (compare.json files).

    benches/compare_tables.py defaults RUN/compare.json
        each method's mean accuracy and ECE over the shifted sets, and AUROC by entropy
    benches/compare_tables.py seeds RUN/compare.json            (from `loren compare --seeds`)
    benches/compare_tables.py seeds SEED0/compare.json SEED1/compare.json ...
        single against lora per seed (test accuracy, ECE, NLL; validation ECE), mean ± sd
    benches/compare_tables.py growth RUN/compare.json           (from `loren compare --sizes`)
    benches/compare_tables.py growth M1/compare.json M2/compare.json ...
        explicit against lora per M: parameters, trainable + gradients + optimizer state,
        peak tensor memory, validation ECE
    benches/compare_tables.py rates RUN/compare.json            (from `loren compare --lrs`)
        per method, size and rate: each seed's validation NLL (what picks the rate, rates.json
        beside it marks the pick), then mean ± sd over seeds of the validation NLL and
        accuracy, the last epoch's training loss, and the test accuracy, ECE and NLL
"""
import json
import statistics
import sys

MIB = 1 << 20


def load(path):
    with open(path) as f:
        return json.load(f)


def runs(path):
    """The runs of one comparison at one seed, by method."""
    by_method = {}
    for r in load(path):
        if r["method"] in by_method:
            sys.exit(f"{path} holds several runs of {r['method']} (a --seeds comparison): "
                     "use `seeds`, or the summary.json beside it")
        by_method[r["method"]] = r
    return by_method


def by_seed(paths):
    """{seed: {method: run}} from one --seeds comparison or one file per seed (a file from
    before runs recorded their seed counts as seed 0, 1, ... in the order given)."""
    seeds = {}
    for i, path in enumerate(paths):
        for r in load(path):
            seeds.setdefault(r.get("seed", i), {})[r["method"]] = r
    return dict(sorted(seeds.items()))


def opt(fmt, v):
    """A figure a run may lack (validation ECE after --train-on-val)."""
    return "-" if v is None else fmt.format(v)


def mean_sd(xs, fmt):
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def defaults(path):
    for method, r in runs(path).items():
        rep = r["report"]
        shift = rep["shift"]
        acc = statistics.mean(s["accuracy"] for s in shift) * 100 if shift else float("nan")
        ece = statistics.mean(s["ece"] for s in shift) if shift else float("nan")
        shift_at_t = [s.get("ece_tempered") for s in shift]
        shift_at_t = (f" ({statistics.mean(shift_at_t):.3f} at T)"
                      if shift and None not in shift_at_t else "")
        auroc = rep["ood"]["entropy"]["auroc"] if rep["ood"] else float("nan")
        t = rep["test"]
        # Reports from before temperature scaling have no `tempered`.
        tempered = rep.get("tempered")
        at_t = (f" | T {tempered['temperature']:.2f}{' (bound)' if tempered.get('at_bound') else ''} "
                f"ECE at T {tempered['ece']:.4f}" if tempered else "")
        print(f"{method:<12} test acc {t['accuracy'] * 100:.2f} ECE {t['ece']:.4f} "
              f"mean confidence {t['mean_confidence']:.3f} | shift mean acc {acc:.1f} "
              f"ECE {ece:.3f}{shift_at_t} | OOD AUROC (entropy) {auroc:.3f} | val ECE {opt('{:.4f}', r['val_ece'])}"
              f"{at_t}")


def seeds(paths):
    print("| seed | single acc | single ECE | single NLL | LoRA acc | LoRA ECE | LoRA NLL "
          "| single val ECE | LoRA val ECE |")
    print("|---|---|---|---|---|---|---|---|---|")
    cols = []
    for seed, rs in by_seed(paths).items():
        s, l = rs["single"], rs["lora"]
        row = [s["report"]["test"]["accuracy"] * 100, s["report"]["test"]["ece"],
               s["report"]["test"]["nll"], l["report"]["test"]["accuracy"] * 100,
               l["report"]["test"]["ece"], l["report"]["test"]["nll"], s["val_ece"],
               l["val_ece"]]
        cols.append(row)
        fmts = ["{:.2f}", "{:.4f}", "{:.4f}"] * 2 + ["{:.4f}"] * 2
        print(f"| {seed} | " + " | ".join(opt(f, v) for f, v in zip(fmts, row)) + " |")
    fmts = ["{:.2f}", "{:.4f}", "{:.4f}"] * 2
    summary = [mean_sd([c[i] for c in cols], fmts[i]) for i in range(6)]
    print("| mean ± sd | " + " | ".join(summary) + " | | |")


def growth(paths):
    print("| M | explicit params | LoRA params | explicit trainable+grads+optimizer MiB "
          "| LoRA trainable+grads+optimizer MiB | explicit peak MiB | LoRA peak MiB "
          "| LoRA/explicit peak | explicit val ECE | LoRA val ECE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_size = {}
    for path in paths:
        for r in load(path):
            if r["method"] in by_size.setdefault(r["members"], {}):
                sys.exit(f"{r['method']} at M = {r['members']} twice (a --seeds comparison?)")
            by_size[r["members"]][r["method"]] = r
    for members, rs in sorted(by_size.items()):
        if "explicit" not in rs or "lora" not in rs:
            sys.exit(f"M = {members} lacks explicit or lora: growth compares the two")
        e, l = rs["explicit"], rs["lora"]

        def state(r):
            p = r["memory"]["peak"]
            return (p["trainable"] + p["gradients"] + p["optimizer_state"]) / MIB

        pe, pl = e["memory"]["total_peak"] / MIB, l["memory"]["total_peak"] / MIB
        print(f"| {e['members']} | {e['trainable_params']:,} | {l['trainable_params']:,} "
              f"| {state(e):.1f} | {state(l):.1f} | {pe:.1f} | {pl:.1f} | {pl / pe:.2f} "
              f"| {opt('{:.4f}', e['val_ece'])} | {opt('{:.4f}', l['val_ece'])} |")


def rates(path):
    import os
    choices = load(os.path.join(os.path.dirname(path), "rates.json"))
    runs_by = {}
    for r in load(path):
        key = (r["method"], r["members"], r["settings"]["train"]["lr"])
        runs_by.setdefault(key, []).append(r)
    print("| method | M | lr | val NLL by seed | val NLL | val acc % | train loss | test acc % "
          "| test ECE | test NLL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in choices:
        for t in c["trials"]:
            rs = runs_by[(c["method"], c["members"], t["lr"])]
            col = lambda f, fmt: mean_sd([f(r) for r in rs], fmt)
            lr = f"**{t['lr']:g}** picked" if t["picked"] else f"{t['lr']:g}"
            by_seed = " / ".join(f"{v:.4f}" for v in t["val_nll"])
            print(f"| {c['method']} | {c['members']} | {lr} | {by_seed} "
                  f"| {col(lambda r: r['val_nll'], '{:.4f}')} "
                  f"| {col(lambda r: 100 * r['val_accuracy'], '{:.2f}')} "
                  f"| {col(lambda r: r['train']['epochs'][-1]['mean_loss'], '{:.4f}')} "
                  f"| {col(lambda r: 100 * r['report']['test']['accuracy'], '{:.2f}')} "
                  f"| {col(lambda r: r['report']['test']['ece'], '{:.4f}')} "
                  f"| {col(lambda r: r['report']['test']['nll'], '{:.4f}')} |")


if __name__ == "__main__":
    modes = {"defaults": lambda p: defaults(p[0]), "seeds": seeds, "growth": growth,
             "rates": lambda p: rates(p[0])}
    if len(sys.argv) < 3 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]](sys.argv[2:])
