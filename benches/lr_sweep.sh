#!/usr/bin/env bash
# Peak learning rates per method on the bundled data, at the default budget: how each default
# (`loren train --help`, --lr) was checked. Every run is `loren train -q` at its defaults but
# --method, --lr and --seed.
#
#   benches/lr_sweep.sh OUT [SEEDS] [METHOD=LR ...]
#
# SEEDS is a comma list (default 0,1,2,3); the default list is every method at 3e-4, 1e-3 and 3e-3.
# Writes OUT/<method>-<lr>-s<seed>/ (each run's outputs), OUT/lr-sweep.json and OUT/lr-sweep.md:
# per method and rate, each seed's validation NLL, then the mean and sample sd over seeds of the
# final epoch's training loss, the validation NLL and accuracy, and the test accuracy, ECE and NLL.
#
# The rule that picks each method's rate (the `picked` column): start at its lowest rate and step
# up to the next while that one's validation NLL is lower at every seed. A rate is chosen on the
# validation part only, and a step on the mean alone could follow one lucky seed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${1:?usage: benches/lr_sweep.sh OUT [SEEDS] [METHOD=LR ...]}
seeds=${2:-0,1,2,3}
shift $(($# < 2 ? $# : 2))
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
    specs=()
    for method in single explicit lora mc-dropout; do
        for lr in 3e-4 1e-3 3e-3; do specs+=("$method=$lr"); done
    done
fi

cargo build --release --quiet
mkdir -p "$out"
for spec in "${specs[@]}"; do
    method=${spec%%=*}
    lr=${spec#*=}
    for seed in ${seeds//,/ }; do
        dir="$out/$method-$lr-s$seed"
        echo "$method at lr $lr, seed $seed"
        ./target/release/loren train -q --method "$method" --lr "$lr" --seed "$seed" --out "$dir" \
            > "$dir.txt"
    done
done

python3 - "$out" "$seeds" "${specs[@]}" <<'EOF'
import json, statistics, subprocess, sys, datetime
out, seeds, specs = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]

def spread(values):
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

rows = []
for spec in specs:
    method, lr = spec.split("=", 1)
    runs = [json.load(open(f"{out}/{method}-{lr}-s{s}/report.json")) for s in seeds]
    over = lambda f: spread([f(r) for r in runs])
    rows.append({
        "method": method, "lr": float(lr), "seeds": [int(s) for s in seeds],
        "val_nll_by_seed": [r["val_nll"] for r in runs],
        "train_loss": over(lambda r: r["train"]["epochs"][-1]["mean_loss"]),
        "val_nll": over(lambda r: r["val_nll"]),
        "val_accuracy": over(lambda r: r["val_accuracy"]),
        "test_accuracy": over(lambda r: r["report"]["test"]["accuracy"]),
        "test_ece": over(lambda r: r["report"]["test"]["ece"]),
        "test_nll": over(lambda r: r["report"]["test"]["nll"]),
        "picked": False,
    })

# The rule in the header: step up a method's rates while the next wins at every seed.
for method in dict.fromkeys(r["method"] for r in rows):
    ladder = sorted((r for r in rows if r["method"] == method), key=lambda r: r["lr"])
    pick = ladder[0]
    for higher in ladder[1:]:
        if all(h < p for h, p in zip(higher["val_nll_by_seed"], pick["val_nll_by_seed"])):
            pick = higher
        else:
            break
    pick["picked"] = True

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
meta = {"date": datetime.date.today().isoformat(), "commit": commit, "device": "cpu",
        "command": "benches/lr_sweep.sh " + " ".join(sys.argv[1:2] + [",".join(seeds)] + specs)}
json.dump({**meta, "rows": rows}, open(f"{out}/lr-sweep.json", "w"), indent=2)
pm = lambda v, fmt, k=1: f"{k * v['mean']:{fmt}} ± {k * v['sd']:{fmt}}"
with open(f"{out}/lr-sweep.md", "w") as f:
    f.write(f"# Learning rates per method\n\n{meta['date']}, commit {commit}, CPU.\n\n")
    f.write(f"`{meta['command']}`\n\nPer seed, the validation NLL (what picks a rate); then mean ± "
            f"sample sd over seeds {', '.join(seeds)}. **picked** marks each method's rate by the "
            "rule: step up while the next rate's validation NLL is lower at every seed.\n\n")
    f.write("| method | lr | val NLL by seed | val NLL | val acc % | train loss | test acc % "
            "| test ECE | test NLL |\n")
    f.write("|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        lr = f"**{r['lr']:g}** picked" if r["picked"] else f"{r['lr']:g}"
        by_seed = " / ".join(f"{v:.4f}" for v in r["val_nll_by_seed"])
        f.write(f"| {r['method']} | {lr} | {by_seed} | {pm(r['val_nll'], '.4f')} | "
                f"{pm(r['val_accuracy'], '.2f', 100)} | {pm(r['train_loss'], '.4f')} | "
                f"{pm(r['test_accuracy'], '.2f', 100)} | {pm(r['test_ece'], '.4f')} | "
                f"{pm(r['test_nll'], '.4f')} |\n")
print(open(f"{out}/lr-sweep.md").read())
EOF
