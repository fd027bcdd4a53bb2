#!/usr/bin/env bash
# Every GPU measurement in one call of the device tool, in sequence, each under its own time
# limit, within SUITE_BUDGET_S seconds in all (default 415): GPU determinism (without and
# with deterministic algorithms), SFT throughput at the Qwen2.5-0.5B and 1.5B shapes (the
# project's TRL path vs a plain loop), rollout throughput at the 0.5B shape.
#
# Here first: `bash benchmarks/gpu_suite.sh --wheels` puts the wheels the GPU image lacks in
# .whl (ignored through .git/info/exclude; ~51 MB, within the device tool's 64 MiB): trl,
# datasets, dill, multiprocess, liger-kernel; .whl/extra: pyarrow and fsspec, installed
# there only if the image's are too old/new for datasets 5.2. Then one device call:
#     run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=480)
# On the GPU machine, from the repository root:
#     bash benchmarks/gpu_suite.sh        # results in $OUT (default ./gpu-out)
# Writes $OUT/log.txt (everything printed), env.json and one JSON per benchmark.
# Needs no GPU to run, but then measures CPU figures (toy shapes: SUITE_TOY=1).

set -u
if [ "${1:-}" = "--wheels" ]; then  # on the development machine: fetch the wheels the GPU image lacks
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    plat="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    # trl 1.12.0 (the project's pin) accepts transformers>=4.56.2 (the image has 5.17)
    python3 -m pip download $plat -d .whl trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        liger-kernel==0.8.5 || exit 1
    python3 -m pip download $plat -d .whl/extra pyarrow==25.0.1 fsspec==2026.9.0 || exit 1
    du -sh .whl
    exit 0
fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUDGET=${SUITE_BUDGET_S:-415}
T0=$(date +%s)
SITE=${SUITE_SITE:-/tmp/site}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

left() { echo $((BUDGET - ($(date +%s) - T0))); }

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left); never abort the suite
step() {
    local name=$1 limit=$2 l s rc
    shift 2
    l=$(left)
    if [ "$l" -lt 25 ]; then
        echo "=== SKIPPED $name: only ${l}s of the suite's ${BUDGET}s left"
        return
    fi
    [ "$limit" -gt "$l" ] && limit=$l
    s=$(date +%s)
    echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S) UTC, $((s - T0))s into the suite)"
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "=== $name: rc=$rc after $(($(date +%s) - s))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
}

install() {
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || echo "wheel install failed"
        # datasets 5.2 wants pyarrow >= 24 and fsspec <= 2026.9.0: carry those only where needed
        need=$($PY - <<'EOF'
import importlib.metadata as md
from packaging.version import Version
out = []
try:
    if Version(md.version("pyarrow")) < Version("24"):
        out.append("pyarrow")
except md.PackageNotFoundError:
    out.append("pyarrow")
try:
    if Version(md.version("fsspec")) > Version("2026.9.0"):
        out.append("fsspec")
except md.PackageNotFoundError:
    out.append("fsspec")
print(" ".join(out))
EOF
)
        for n in $need; do
            ls .whl/extra/$n-*.whl >/dev/null 2>&1 && echo "installing carried $n" && \
                $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                    .whl/extra/$n-*.whl
        done
    fi
}

preflight() {
    date -u
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv 2>&1
    $PY - <<'EOF'
import importlib.metadata as md, json, os, platform, time
env = {"python": platform.python_version(), "machine": platform.node()}
for n in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "triton", "pyarrow",
          "fsspec", "huggingface-hub", "tokenizers", "numpy"):
    try:
        env[n] = md.version(n)
    except md.PackageNotFoundError:
        env[n] = None
import torch
env["cuda"] = torch.version.cuda
env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
for mod in ("trl", "datasets", "liger_kernel.transformers", "cellpuzzles.train.sft"):
    try:
        __import__(mod)
        env["import " + mod] = "ok"
    except Exception as e:  # noqa: BLE001
        env["import " + mod] = f"{type(e).__name__}: {e}"
if torch.cuda.is_available():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        a @ b
    e.record()
    torch.cuda.synchronize()
    env["bf16_matmul_8192_tflops"] = round(20 * 2 * n**3 / (s.elapsed_time(e) / 1e3) / 1e12, 1)
print(json.dumps(env, indent=1))
open(os.path.join(os.environ["OUT"], "env.json"), "w").write(json.dumps(env, indent=1))
EOF
}

{
    echo "gpu_suite: budget ${BUDGET}s, OUT=$OUT"
    export OUT PY SITE
    export -f install preflight
    step install 60 bash -c install
    step preflight 40 bash -c preflight
    if [ "${SUITE_TOY:-0}" = 1 ]; then
        step det-off 120 $PY benchmarks/gpu_determinism.py --shape toy --steps 2 --runs 2 --json "$OUT/det_off.json"
        step sft-toy 200 $PY benchmarks/sft_gpu.py --shape toy --steps 2 --warmup 1 --batch 2 --seq 1100 \
            --variants plain_ckpt,project --json "$OUT/sft_toy.json"
        step rollout-toy 60 $PY benchmarks/rollout.py --shape toy --batch 2 --prompt-tokens 16 --new-tokens 8 \
            --repeats 1 --warmup 1 --baseline-warmup 1 --json "$OUT/rollout_toy.json"
    else
        step det-off 45 $PY benchmarks/gpu_determinism.py --json "$OUT/det_off.json"
        step det-on 45 $PY benchmarks/gpu_determinism.py --deterministic --json "$OUT/det_on.json"
        step sft-0.5b 100 $PY benchmarks/sft_gpu.py --shape 0.5b --steps 12 --warmup 3 \
            --variants plain_ckpt,project,plain_nockpt,project_nopack --json "$OUT/sft_0.5b.json"
        step rollout-0.5b 120 $PY benchmarks/rollout.py --shape 0.5b --batch 64 --prompt-tokens 512 \
            --new-tokens 256 --repeats 2 --warmup 2 --baseline-warmup 1 --json "$OUT/rollout_0.5b.json"
        step sft-1.5b 110 $PY benchmarks/sft_gpu.py --shape 1.5b --steps 10 --warmup 3 \
            --variants plain_ckpt,project,plain_nockpt --json "$OUT/sft_1.5b.json"
    fi
    echo "=== suite done after $(($(date +%s) - T0))s"
    echo "=== summary of $OUT/*.json"
    $PY - <<'EOF'
import glob, json, os
for f in sorted(glob.glob(os.path.join(os.environ["OUT"], "*.json"))):
    try:
        r = json.load(open(f))
    except Exception as e:  # noqa: BLE001
        print(os.path.basename(f), "unreadable:", e)
        continue
    b = r.get("benchmark")
    if b == "sft_gpu":
        for k, v in r["variants"].items():
            if "tokens_per_s" in v:
                print(f"sft {r['shape']:4s} {k:20s} {v['tokens_per_s']:9.0f} tok/s  MFU {v['mfu']:.3f}  "
                      f"peak {v.get('peak_gb') or 0:.1f} GB  x{v.get('ratio_to_plain_ckpt', float('nan')):.2f}")
            else:
                print(f"sft {r['shape']:4s} {k:20s} FAILED {v.get('error', '')[:160]}")
    elif b == "rollout":
        for k, v in r["runs"].items():
            print(f"rollout {r['shape']} b{r['batch']} {k:8s} {v['tokens_per_s']:9.0f} tok/s  times {v['times_s']}")
        print(f"rollout ratio project/baseline {r.get('ratio_project_to_baseline')}")
    elif b == "gpu_determinism":
        for name, v in [*r["plain"].items(), ("project", r.get("project") or {})]:
            for i, c in enumerate(v.get("vs_run0", []), 1):
                print(f"det={r['deterministic']!s:5s} {name:8s} run{i}: identical={c['bit_identical']} "
                      f"max|dW|={c['max_abs_dweight']:.2e} rel={c['max_abs_dweight_rel']:.2e} "
                      f"max|dloss|={c['max_abs_dloss']:.2e} first differing step {c['first_step_differing']}")
            if "error" in v or "skipped" in v:
                print(f"det={r['deterministic']} {name}: {v.get('error') or v.get('skipped')}")
        if r.get("strict_error"):
            print("strict deterministic error:", r["strict_error"][:300])
    elif "gpu" in r:
        print("env:", json.dumps(r))
EOF
} 2>&1 | tee "$OUT/log.txt"
