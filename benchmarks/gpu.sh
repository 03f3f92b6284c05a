#!/usr/bin/env bash
# The GPU benchmark suite: one process per benchmark, no Ray, <= 6 minutes on one GPU.
#
#   benchmarks/gpu.sh fetch    # on a machine with PyPI: wheels the GPU image lacks -> benchmarks/wheels/
#   benchmarks/gpu.sh          # on the GPU machine: install those wheels if needed, then run
#
# Runs bench_step.py on the GPU (the paper's fp32 setup against octssl's bf16 + channels_last_3d DeepSpeed
# ZeRO-1 path, torch.compile, a batch sweep; time budget 240 s, later rows reported as skipped) and
# bench_models.py (FLOPs, parameters, saved activations; its speed rows run on the host CPU). Results:
# benchmarks/results/step-cuda-<gpu>.json/.png and models-cuda-<gpu>-host-cpu.json; with OUT set (the
# device tool), copies land in $OUT too. The image this project's GPU machines run (Python 3.12, torch
# 2.11) lacks deepspeed, hjson, pydantic and monai: `fetch` downloads them (deepspeed as its source, built
# there with DS_BUILD_OPS=0 against the CUDA torch), `run` installs them into /tmp/octssl-site.
# With the device tool: carry ["benchmarks/wheels"] (ignored via .git/info/exclude) and run
# `bash benchmarks/gpu.sh` with timeout_s >= 420.
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
  local slug
  slug="$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import common, torch; print(common.device_slug(torch.device("cuda")))')"
  local status=0
  timeout 330 "$PY" benchmarks/bench_step.py --budget-s "${STEP_BUDGET_S:-240}" \
    --out "benchmarks/results/step-$slug.json" || status=$?
  timeout 60 "$PY" benchmarks/bench_models.py --steps 3 --out "benchmarks/results/models-$slug-host-cpu.json" || status=$?
  if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/step-"$slug".* benchmarks/results/models-"$slug"-host-cpu.json "$OUT"/ 2>/dev/null || true
  fi
  return "$status"
}

case "${1:-run}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: $0 [fetch|run]" >&2; exit 64 ;;
esac
