"""loren's CPU training step against PyTorch's, in alternating rounds on the same machine.

A shared VM's speed drifts by tens of percent within minutes, so one timing of each says little.
Each round runs every loren binary given (`loren bench`, tiny, M members, lora only) and then
lora_ensemble_step.py (eager and torch.compile), so the drift hits all of them alike. The median
of the rounds' medians is the comparison.

Run from the repository root, with a Python that has torch:
  python benches/pytorch/side_by_side.py --loren target/release/loren --out DIR
  python benches/pytorch/side_by_side.py --loren new=target/release/loren --loren old=/tmp/loren-old --out DIR

It writes DIR/pytorch-step.json (every round, both sides' commands) and DIR/pytorch-step.md.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_commit():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0
    return r.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def run_loren(binary, a, tmp):
    out = os.path.join(tmp, "bench")
    cmd = [binary, "bench", "--device", "cpu", "--config", "tiny", "--members", str(a.members),
           "--methods", "lora", "--warmup", str(a.warmup), "--repeats", str(a.repeats), "-q",
           "--out", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "bench.json")) as f:
        bench = json.load(f)
    train = bench["rows"][0]["train"]
    return cmd, {"median_ms": 1e3 * train["median"], "min_ms": 1e3 * train["min"],
                 "max_ms": 1e3 * train["max"],
                 "gemm_peak_gflops": (bench["peak"] or {}).get("flops_per_s", 0) / 1e9}


def run_pytorch(a, tmp):
    out = os.path.join(tmp, "pytorch.json")
    cmd = [sys.executable, os.path.join(HERE, "lora_ensemble_step.py"), "--members", str(a.members),
           "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--json", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        info = json.load(f)
    return cmd, info["torch"], {r["variant"]: r for r in info["rows"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loren", action="append", required=True, metavar="[LABEL=]BINARY",
                    help="a loren binary to time, labelled (default label: loren); repeatable")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", required=True, help="folder for pytorch-step.json and .md")
    a = ap.parse_args()
    binaries = [s.split("=", 1) if "=" in s else ["loren", s] for s in a.loren]
    labels = [label for label, _ in binaries]
    if len(set(labels)) != len(labels):
        ap.error("give each --loren its own label: LABEL=BINARY")
    for label, binary in binaries:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            ap.error(f"--loren {label}: {binary} is not an executable file (build it: cargo build --release)")
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0:
        ap.error(f"{sys.executable} cannot import torch: run this with a Python that has it")

    rounds, commands, torch_version = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, a.rounds + 1):
            row = {"round": i}
            for label, binary in binaries:
                commands[label], row[label] = run_loren(binary, a, tmp)
            commands["pytorch"], torch_version, variants = run_pytorch(a, tmp)
            for name, r in variants.items():
                row[f"pytorch {name}"] = {k: r[k] for k in ("median_ms", "min_ms", "max_ms")}
            rounds.append(row)
            print(f"round {i}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in row.items()
                                             if k != "round"), flush=True)

    columns = [k for k in rounds[0] if k != "round"]
    medians = {c: statistics.median(r[c]["median_ms"] for r in rounds) for c in columns}
    pytorch_best = min(v for c, v in medians.items() if c.startswith("pytorch"))
    info = {
        "what": f"training step, tiny ViT, LoRA-Ensemble M={a.members}, batch 32, rank 8, AdamW + "
                "clipping; loren against PyTorch on the same cores, alternating",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "host_cpu": cpu_model(),
        "torch": torch_version,
        "commands": {k: " ".join(v) for k, v in commands.items()},
        "rounds": rounds,
        "median_of_medians_ms": medians,
        "best_pytorch_over": {c: pytorch_best / medians[c] for c in labels},
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pytorch-step.json"), "w") as f:
        json.dump(info, f, indent=2)

    lines = [
        "# loren against PyTorch: the CPU training step, side by side", "",
        f"- what: {info['what']}",
        f"- machine: {info['host_cpu']}, {os.cpu_count()} cores; date {info['date']}; commit {info['commit']}",
        f"- PyTorch {torch_version}; `benches/pytorch/side_by_side.py`, {a.rounds} rounds",
        "- commands:",
        *[f"  - {k}: `{v}`" for k, v in info["commands"].items()], "",
        f"Median step time of {a.repeats} timed steps after {a.warmup} warm-up steps, in ms"
        " (loren's `gemm peak` is its 2048³ f32 GEMM rate in the same call, GFLOP/s):", "",
        "| round | " + " | ".join(columns) + " | " + " | ".join(f"{c} gemm peak" for c in labels) + " |",
        "|---" * (1 + len(columns) + len(labels)) + "|",
    ]
    for r in rounds:
        lines.append(f"| {r['round']} | " + " | ".join(f"{r[c]['median_ms']:.1f}" for c in columns)
                     + " | " + " | ".join(f"{r[c]['gemm_peak_gflops']:.0f}" for c in labels) + " |")
    lines.append("| median | " + " | ".join(f"{medians[c]:.1f}" for c in columns)
                 + " |" + " |" * len(labels))
    lines += ["", "Best PyTorch variant's median over loren's: " + ", ".join(
        f"{c} {info['best_pytorch_over'][c]:.2f}x" for c in labels) + "."]
    with open(os.path.join(a.out, "pytorch-step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-3 - len(rounds):]))


if __name__ == "__main__":
    main()
