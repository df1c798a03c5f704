#!/usr/bin/env bash
# Peak learning rates per method on the bundled data, at the default budget: how each default
# (`loren train --help`, --lr) was checked. Every run is `loren train -q` at its defaults but
# --method, --lr and --seed.
#
#   benches/lr_sweep.sh OUT [SEEDS] [METHOD=LR ...]
#
# SEEDS is a comma list (default 0,1). Writes OUT/<method>-<lr>-s<seed>/ (each run's outputs),
# OUT/lr-sweep.json and OUT/lr-sweep.md: per method and rate, the mean over seeds of the final
# epoch's training loss, the validation NLL and ECE (how a rate is chosen) and the test accuracy,
# ECE and NLL. (The committed results add, by hand, what the table settled.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${1:?usage: benches/lr_sweep.sh OUT [SEEDS] [METHOD=LR ...]}
seeds=${2:-0,1}
shift $(($# < 2 ? $# : 2))
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
    specs=(single=3e-4 single=1e-3 explicit=3e-4 explicit=1e-3 lora=3e-4 lora=1e-3 lora=3e-3
        mc-dropout=3e-4 mc-dropout=1e-3 mc-dropout=2e-3)
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
rows = []
for spec in specs:
    method, lr = spec.split("=", 1)
    runs = [json.load(open(f"{out}/{method}-{lr}-s{s}/report.json")) for s in seeds]
    mean = lambda f: statistics.fmean(f(r) for r in runs)
    rows.append({
        "method": method, "lr": float(lr), "seeds": [int(s) for s in seeds],
        "train_loss": mean(lambda r: r["train"]["epochs"][-1]["mean_loss"]),
        "val_nll": mean(lambda r: r["val_nll"]), "val_ece": mean(lambda r: r["val_ece"]),
        "test_accuracy": mean(lambda r: r["report"]["test"]["accuracy"]),
        "test_ece": mean(lambda r: r["report"]["test"]["ece"]),
        "test_nll": mean(lambda r: r["report"]["test"]["nll"]),
    })
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
meta = {"date": datetime.date.today().isoformat(), "commit": commit,
        "command": "benches/lr_sweep.sh " + " ".join(sys.argv[1:2] + [",".join(seeds)] + specs)}
json.dump({**meta, "rows": rows}, open(f"{out}/lr-sweep.json", "w"), indent=2)
with open(f"{out}/lr-sweep.md", "w") as f:
    f.write(f"# Learning rates per method\n\n{meta['date']}, commit {commit}, CPU.\n\n")
    f.write(f"`{meta['command']}`\n\nMeans over seeds {', '.join(seeds)}; the last epoch's "
            "mean training loss, then validation and test scores.\n\n")
    f.write("| method | lr | train loss | val NLL | val ECE | test acc % | test ECE | test NLL |\n")
    f.write("|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['method']} | {r['lr']:g} | {r['train_loss']:.4f} | {r['val_nll']:.4f} | "
                f"{r['val_ece']:.4f} | {100 * r['test_accuracy']:.2f} | {r['test_ece']:.4f} | "
                f"{r['test_nll']:.4f} |\n")
print(open(f"{out}/lr-sweep.md").read())
EOF
