#!/usr/bin/env bash
# GPU throughput of d2m in one command, for whoever has a CUDA machine (x86-64, Python 3.11 or 3.12):
#
#     bench/gpu.sh
#
# Sets up .venv (`make setup`) unless it exists, makes DataComp-like shards in .bench/gpu (4 x 10,000
# samples, 512 px longest side, JPEG quality 95) unless they exist, then writes JSON lines to
# bench/results/<gpu>-<config>.jsonl: `d2m bench` on configs/basic.yml and configs/datacomp.yml (random
# weights of the real architectures, bf16), and bench/results/<gpu>-fastpath.jsonl: the device
# preprocessing path (nvJPEG decode + tensor transforms) against the PIL path, fidelity and images/s.
# Knobs (environment): DEVICE (0), PRECISION (bf16), SHARDS (4), SAMPLES (10000), CONFIGS ("basic datacomp"),
# SHARD_DIR (.bench/gpu), RESULTS (bench/results), PYTHON (for a new .venv when python3.11 is missing, e.g. python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-0}"
PRECISION="${PRECISION:-bf16}"
SHARDS="${SHARDS:-4}"
SAMPLES="${SAMPLES:-10000}"
CONFIGS="${CONFIGS:-basic datacomp}"
SHARD_DIR="${SHARD_DIR:-.bench/gpu}"
RESULTS="${RESULTS:-bench/results}"
say() { printf '\n== %s\n' "$*" >&2; }

if [ ! -x .venv/bin/d2m ]; then
    if command -v python3.11 >/dev/null 2>&1; then
        say "setting up .venv (make setup)"
        make setup
    else
        PYTHON="${PYTHON:-python3.12}"
        command -v "$PYTHON" >/dev/null 2>&1 || { echo "need python3.11 (or PYTHON=python3.12)" >&2; exit 1; }
        say "no python3.11: setting up .venv with $PYTHON (the steps of make setup; pyproject says 3.11)"
        "$PYTHON" -m venv .venv
        .venv/bin/pip install -r requirements/requirements.txt -c requirements/constraints.txt
        .venv/bin/pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1
        .venv/bin/pip install --no-deps --no-build-isolation --ignore-requires-python -e .
    fi
fi

if [ "$DEVICE" = "cpu" ]; then
    GPU="cpu"
else
    .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "torch sees no CUDA device: d2m would silently run on the CPU (set DEVICE=cpu to do that)" >&2; exit 1; }
    INDEX="${DEVICE#cuda:}"
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$INDEX" | head -n 1)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$INDEX" >&2
fi
SLUG="$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
mkdir -p "$RESULTS"

if ! compgen -G "$SHARD_DIR/*.tar" >/dev/null; then
    say "making $SHARDS shards of $SAMPLES samples in $SHARD_DIR"
    .venv/bin/d2m make-shards "$SHARD_DIR" --shards "$SHARDS" --samples "$SAMPLES" --max-side 512 --jpeg-quality 95 >/dev/null
fi

status=0
say "device preprocessing path (fidelity vs PIL, images/s) -> $RESULTS/$SLUG-fastpath.jsonl"
.venv/bin/python -m d2m_core.fastpath --shards "$SHARD_DIR" --device "$DEVICE" --precision "$PRECISION" \
    --images 2048 --batch-size 256 | tee "$RESULTS/$SLUG-fastpath.jsonl" || status=1

for config in $CONFIGS; do
    say "d2m bench configs/$config.yml -> $RESULTS/$SLUG-$config.jsonl"
    D2M_RANDOM_WEIGHTS=1 .venv/bin/d2m bench --yml "configs/$config.yml" --shards "$SHARD_DIR" \
        --device "$DEVICE" --precision "$PRECISION" | tee "$RESULTS/$SLUG-$config.jsonl" || status=1
done

say "fast path tests (the CUDA one runs here)"
.venv/bin/pytest -q tests/core/test_fastpath.py || status=1
say "results in $RESULTS/$SLUG-*.jsonl (exit status $status)"
exit "$status"
