#!/usr/bin/env bash
# Here, after a GPU run: turn the folder the device tool brought back from `.gpu/run.sh` into
# benches/results/<date>-<gpu>/, ready to commit:
#   index.md        device, driver, date, the commit the bundle was built from, the command, and the summary of every check
#   summary.md  device.txt  *.log            as they came back
#   kernel-bench/ bench/ bench-breakdown/ bench-wgmma/ memprofile/ memprofile-recompute/ bench-mc-dropout/ train-*/ compare-cuda/ from results.tar.gz (JSON, Markdown, SVG)
#
#   scripts/gpu-results.sh FOLDER 'the command that ran there'
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=${1:?usage: scripts/gpu-results.sh FOLDER 'COMMAND'}
command=${2:-bash .gpu/run.sh}
[ -f "$src/summary.md" ] || { echo "gpu-results: $src/summary.md is missing" >&2; exit 1; }

# The device.txt query line: name, driver_version, memory.total, clocks.max.sm.
query=$(grep -A1 '^name, driver_version' "$src/device.txt" | tail -n 1 || true)
gpu=$(echo "$query" | cut -d, -f1 | xargs)
driver=$(echo "$query" | cut -d, -f2 | xargs)
gpu=${gpu:-unknown GPU}
# run.sh writes the commit gpu-bundle.sh built from; a run without it is named by HEAD, marked so.
built=$(sed -n 's/^bundle built from commit: //p' "$src/device.txt" | head -n 1)
if [ -n "$built" ] && [ "$built" != unknown ]; then
    built="$built, the bundle's"
else
    built="$(git rev-parse --short HEAD)? (not recorded by the run; HEAD now)"
fi
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
# The day of the run, from the `date -u` line run.sh wrote, else today.
ran=$(grep -m1 -E '^[A-Z][a-z]{2} [A-Z][a-z]{2} +[0-9]+ [0-9:]+ UTC [0-9]{4}$' "$src/device.txt" || true)
date=$(date -u -d "${ran:-now}" +%Y-%m-%d 2>/dev/null || date -u +%Y-%m-%d)
dest=benches/results/gpu-$date-$slug
mkdir -p "$dest"

cp "$src"/summary.md "$src"/device.txt "$dest"/
for f in "$src"/*.log; do [ -f "$f" ] && cp "$f" "$dest"/; done
# A run cut short may bring back an archive cut short too: take what it holds, and say so.
if [ -f "$src/results.tar.gz" ] && ! tar -xzf "$src/results.tar.gz" -C "$dest"; then
    echo "gpu-results: $src/results.tar.gz is damaged; kept what it gave" >&2
fi

{
    echo "# GPU run of $date on $gpu"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| device | $gpu |"
    echo "| driver | ${driver:-see device.txt} |"
    echo "| date | $date (UTC) |"
    echo "| commit | $built |"
    echo "| command | \`$command\` |"
    echo
    echo "## Checks"
    echo
    cat "$src/summary.md"
    for f in kernel-bench/kernel-bench.md bench/bench.md bench-breakdown/bench.md bench-wgmma/bench.md memprofile/memprofile.md \
        memprofile-recompute/memprofile.md bench-mc-dropout/bench.md; do
        if [ -f "$dest/$f" ]; then
            echo
            echo "## $(dirname "$f")"
            tail -n +2 "$dest/$f"  # its own title is the heading above
        fi
    done
} >"$dest/index.md"
echo "wrote $dest"
