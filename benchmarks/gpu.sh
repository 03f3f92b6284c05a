#!/usr/bin/env bash
# The GPU benchmark: the train step's levers, one guarded row each, in one call of <= 6 minutes on one GPU.
#
#   benchmarks/gpu.sh fetch    # on a machine with PyPI: wheels the GPU image lacks -> benchmarks/wheels/
#   benchmarks/gpu.sh          # on the GPU machine: install those wheels if needed, then run
#   benchmarks/gpu.sh smoke    # on any CPU, in seconds to minutes: the same rows at a tiny crop (the plumbing)
#
# Runs bench_levers.py: the paper's fp32 setup, octssl's default path (DeepSpeed, auto policy) and every
# lever (bf16, channels_last_3d inputs / network, CUDA graph, ZeRO-0 vs 1, torch vs DeepSpeed autocast,
# pageable vs pinned host batches, batch sweeps, torch.compile max-autotune-no-cudagraphs), each row in a
# supervised worker with its own time bound, within GPU_SH_BUDGET_S (default 330 s) for the whole script,
# install included; then bench_models.py if at least 60 s are left. The results JSON is rewritten after
# every row, into $OUT when set (the device tool) so that a run cut short still brings its rows back, else
# into benchmarks/results/: levers-cuda-<gpu>.json/.png and models-cuda-<gpu>-host-cpu.json. Arguments after
# `run` or `smoke` go to bench_levers.py (e.g. `--only compile,octssl-compile` to rerun skipped rows).
# The image this project's GPU machines run (Python 3.12, torch 2.11) lacks deepspeed, hjson, pydantic and
# monai: `fetch` downloads them (deepspeed as its source, built there with DS_BUILD_OPS=0 against the CUDA
# torch), `run` installs them into /tmp/octssl-site.
# With the device tool: carry ["benchmarks/wheels"] (ignored via .git/info/exclude) and run
# `bash benchmarks/gpu.sh` with timeout_s >= 360.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
WHEELS="$HERE/wheels"
PY="${PYTHON:-python3}"
PYVER="${PYVER:-3.12}"
# What the GPU image lacks (KINDS.md lists what it has): name each dependency, pip resolves none offline.
PACKAGES=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
          monai==1.6.1)
DEEPSPEED=deepspeed==0.19.8

fetch() {
  mkdir -p "$WHEELS"
  grep -qx '/benchmarks/wheels/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/benchmarks/wheels/' >>"$REPO/.git/info/exclude"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PACKAGES[@]}"
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$WHEELS" "$DEEPSPEED"
  ls -la "$WHEELS"
}

missing() {
  "$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("deepspeed", "hjson", "pydantic", "monai", "yaml", "matplotlib")
               if importlib.util.find_spec(m) is None))
EOF
}

run() {
  local begin=$SECONDS budget="${GPU_SH_BUDGET_S:-330}"
  cd "$REPO"
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); use make bench on CPU" >&2
    exit 2
  fi
  local absent
  absent="$(missing)"
  if [ -n "$absent" ]; then
    if [ ! -d "$WHEELS" ]; then
      echo "gpu.sh: missing Python packages ($absent) and no $WHEELS: run 'benchmarks/gpu.sh fetch' where PyPI is reachable" >&2
      exit 3
    fi
    echo "installing ($absent) from $WHEELS into /tmp/octssl-site"
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
      --target /tmp/octssl-site "$WHEELS"/*
    export PYTHONPATH="/tmp/octssl-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$REPO/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  unset DS_ACCELERATOR
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  local slug out_dir="${OUT:-$REPO/benchmarks/results}"
  slug="$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import common, torch; print(common.device_slug(torch.device("cuda")))')"
  mkdir -p "$out_dir"
  local left=$((budget - (SECONDS - begin) - 20)) status=0
  [ "$left" -ge 30 ] || left=30  # a slow install still leaves the first rows a chance
  echo "gpu.sh: $((SECONDS - begin)) s for setup; bench_levers gets $left s"
  timeout $((left + 15)) "$PY" benchmarks/bench_levers.py --budget-s "$left" --out "$out_dir/levers-$slug.json" "$@" \
    || status=$?
  left=$((budget - (SECONDS - begin)))
  if [ "$left" -ge 60 ]; then
    timeout $((left - 10)) "$PY" benchmarks/bench_models.py --steps 3 --out "$out_dir/models-$slug-host-cpu.json" \
      || status=$?
  else
    echo "gpu.sh: bench_models skipped ($left s left)"
  fi
  if [ -n "${OUT:-}" ]; then
    cp "$OUT"/levers-"$slug".* "$OUT"/models-"$slug"-host-cpu.json "$REPO/benchmarks/results/" 2>/dev/null || true
  fi
  echo "gpu.sh: done in $((SECONDS - begin)) s (budget $budget s)"
  return "$status"
}

smoke() {
  cd "$REPO"
  local out_dir="${OUT:-/tmp/octssl-gpu-smoke}"
  mkdir -p "$out_dir"
  PYTHONPATH="$REPO/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_ACCELERATOR=cpu \
    "$PY" benchmarks/bench_levers.py --smoke --out "$out_dir/levers-smoke.json" "$@"
}

case "${1:-run}" in
  fetch) fetch ;;
  run) shift || true; run "$@" ;;
  smoke) shift; smoke "$@" ;;
  *) echo "usage: $0 [fetch|run|smoke] [bench_levers.py options]" >&2; exit 64 ;;
esac
