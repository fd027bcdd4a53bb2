#!/usr/bin/env bash
# Peak memory of `cellpuzzles puzzles` on a 1,000,000-cell synthetic .h5ad (target: < 4 GB RSS).
# Baseline for scale: the same command on the 700-cell bundled file, measured in the same run.
# Usage: bash benchmarks/puzzles_1m.sh [CELLS] [GENES]
set -euo pipefail
cells=${1:-1000000}
genes=${2:-2000}
work=${BENCH_DIR:-/tmp/cellpuzzles-bench}
mkdir -p "$work"
big="$work/synth_${cells}x${genes}.h5ad"
[ -f "$big" ] || cellpuzzles synth --cells "$cells" --genes "$genes" --donors 8 --out "$big"
[ -f "$work/data/pbmc68k_reduced.h5ad" ] || cellpuzzles prepare --dir "$work/data" >/dev/null

measure() {  # label file -> prints wall seconds and peak RSS (KB)
  local label=$1 file=$2 out="$work/out_$1"
  rm -rf "$out"
  /usr/bin/time -v cellpuzzles puzzles "$file" --out "$out" --cells-out "$out/cells.parquet" \
    >"$work/$label.stdout" 2>"$work/$label.time"
  local rss wall
  rss=$(grep "Maximum resident set size" "$work/$label.time" | awk '{print $NF}')
  wall=$(grep "Elapsed (wall clock)" "$work/$label.time" | awk '{print $NF}')
  echo "$label $rss $wall"
}

read -r _ small_rss small_wall < <(measure bundled "$work/data/pbmc68k_reduced.h5ad")
read -r _ big_rss big_wall < <(measure large "$big")
python3 - "$cells" "$genes" "$small_rss" "$small_wall" "$big_rss" "$big_wall" <<'PY'
import sys
cells, genes, s_rss, s_wall, b_rss, b_wall = sys.argv[1:]
gb = int(b_rss) / 1024**2
print(f"cellpuzzles puzzles (validate + top-50 + cells.parquet + splits)")
print(f"  bundled 700 cells      : peak RSS {int(s_rss)/1024:8.0f} MB  wall {s_wall}")
print(f"  synthetic {int(cells):,} x {genes}: peak RSS {int(b_rss)/1024:8.0f} MB  wall {b_wall}")
print(f"  ratio large/bundled RSS: {int(b_rss)/int(s_rss):.2f}x   target < 4 GB: {'met' if gb < 4 else 'NOT met'} ({gb:.2f} GB)")
PY
