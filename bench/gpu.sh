#!/usr/bin/env bash
# GPU throughput of d2m in one command, for whoever has a CUDA machine (x86-64, Python 3.11 or 3.12):
#
#     bench/gpu.sh                       # sets up .venv with `make setup` (needs the package registry)
#     WHEELS=.whl bench/gpu.sh           # no registry: the machine's python3 already has torch; the wheels in
#                                        # WHEELS (dagster, open_clip, pydantic, ...) go to a scratch folder
#
# Makes DataComp-like shards in .bench/gpu (4 x 10,000 samples, 512 px longest side, JPEG quality 95, rendered by
# every core) unless they exist, then, with random weights of the real architectures (D2M_RANDOM_WEIGHTS=1), each
# config set to READERS reading processes and NWORKERS threads, writes to bench/results/<gpu>-*:
#   <gpu>-<config>.jsonl   `d2m bench` (end to end in one process, model-only, bf16-vs-fp32 fidelity)
#   <gpu>-run.jsonl        `d2m run` through Dagster (a fresh instance, the run as the CLI launches it): wall time
#                          from the command's start to its exit (what it printed: its last lines, on stderr)
#   <gpu>-parts.jsonl      `d2m bench --stage parts`: where a batch's time goes (the loader with device preprocessing
#                          and a consumer that only counts; decoding; resizing batched and per image size; each model)
#   <gpu>-fastpath.jsonl   the device preprocessing path (nvJPEG decode + tensor transforms) against PIL
#   <gpu>-loader.jsonl     `d2m bench --stage loader` with 1, 2 and 4 reading processes (LOADER_PROCESSES; with
#                          LOADER_DECODE=1 the readers decode, as gpu_decode: readers, and batches go up to DEVICE)
#   <gpu>-writer.jsonl     `d2m bench --stage writer` (the output stage alone, on this machine's CPU)
#   <gpu>-run-overhead.jsonl  `d2m bench --stage run-overhead`: one Dagster run over the first shard, launched as a
#                          run worker process (launch to model build and first batch, teardown)
# then runs the CUDA tests (nvJPEG and the transforms; CUDA graphs; the engine issuing a batch without waiting for the
# device). Stages run in the order of STAGES; a failed step is reported and the next one runs.
# Knobs (environment): DEVICE (0), PRECISION (bf16), SHARDS (4), SAMPLES (10000), CONFIGS ("basic datacomp"),
# RUN_CONFIGS ("basic datacomp"), RUN_SHARDS (the shards a `d2m run` reads: SHARD_DIR's, or this many links to them in
# turn, so that a run's fixed cost weighs as in a long run), OVERHEAD_CONFIGS (RUN_CONFIGS), READERS (auto, the configs'
# default: 2, or every core but 4 when the readers decode; or a number), NWORKERS (8), SHARD_DIR (.bench/gpu),
# RESULTS (bench/results), FASTPATH_IMAGES (2048), GPU_DECODE (the configs' gpu_decode, e.g. readers or off),
# COMPILE_CONFIGS (configs run with torch_compile: true, e.g. "datacomp"; none by default), GRAPH_CONFIGS (likewise
# cuda_graphs: true), DECODE_SHARE (reader_decode_share, with GPU_DECODE=readers: e.g. 0.7),
# STAGES ("shards bench run parts fastpath loader writer overhead tests"), STEP_TIMEOUT (s per step, 300),
# CUDA_TESTS_MORE (more test files for the tests stage, e.g. tests/core/test_model_faces.py where insightface
# and onnxruntime-gpu are installed),
# PYTHON (the interpreter: for WHEELS, default python3; for a new .venv when python3.11 is missing, e.g. python3.12).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-0}"
PRECISION="${PRECISION:-bf16}"
SHARDS="${SHARDS:-4}"
SAMPLES="${SAMPLES:-10000}"
CONFIGS="${CONFIGS:-basic datacomp}"
RUN_CONFIGS="${RUN_CONFIGS:-basic datacomp}"
OVERHEAD_CONFIGS="${OVERHEAD_CONFIGS:-$RUN_CONFIGS}"
FASTPATH_IMAGES="${FASTPATH_IMAGES:-2048}"
GPU_DECODE="${GPU_DECODE:-}"
COMPILE_CONFIGS="${COMPILE_CONFIGS:-}"
GRAPH_CONFIGS="${GRAPH_CONFIGS:-}"
DECODE_SHARE="${DECODE_SHARE:-}"
READERS="${READERS:-auto}"
READERS_JSON="$([[ "$READERS" =~ ^[0-9]+$ ]] && echo "$READERS" || echo "\"$READERS\"")"  # as the lines record it
LOADER_PROCESSES="${LOADER_PROCESSES:-1 2 4}"
RUN_SHARDS="${RUN_SHARDS:-}"
NWORKERS="${NWORKERS:-8}"
SHARD_DIR="${SHARD_DIR:-.bench/gpu}"
RESULTS="${RESULTS:-bench/results}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
STAGES="${STAGES:-shards bench run parts fastpath loader writer overhead tests}"
SCRATCH="$(mktemp -d -t d2m-gpu-XXXXXX)"
export D2M_RANDOM_WEIGHTS=1 PYTHONUNBUFFERED=1
say() { printf '\n== %s (%s)\n' "$*" "$(date +%T)" >&2; }
status=0
step() { timeout "$STEP_TIMEOUT" "$@"; }  # callers add `|| status=1`: a failed step is reported, the next one runs
if [ -n "${WHEELS:-}" ]; then
    PY="${PYTHON:-python3}"
    say "no registry: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SCRATCH/site for $("$PY" -V)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SCRATCH/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p "$SCRATCH/bin"
    printf '#!/bin/sh\nexec %s -c "import sys; from d2m_assets.cli import main; sys.exit(main())" "$@"\n' "$PY" >"$SCRATCH/bin/d2m"
    chmod +x "$SCRATCH/bin/d2m"
    export PATH="$SCRATCH/bin:$PATH"
    D2M="$SCRATCH/bin/d2m"
    "$PY" -c 'import d2m_assets.definitions, d2m_core.compute.pipeline, open_clip, torch; print("imports ok, torch", torch.__version__)' || exit 1
else
    if [ ! -x .venv/bin/d2m ]; then
        if command -v python3.11 >/dev/null 2>&1; then
            say "setting up .venv (make setup)"
            make setup || exit 1
        else
            PYTHON="${PYTHON:-python3.12}"
            command -v "$PYTHON" >/dev/null 2>&1 || { echo "need python3.11 (or PYTHON=python3.12)" >&2; exit 1; }
            say "no python3.11: setting up .venv with $PYTHON (the steps of make setup; pyproject says 3.11)"
            "$PYTHON" -m venv .venv
            .venv/bin/pip install -r requirements/requirements.txt -c requirements/constraints.txt || exit 1
            .venv/bin/pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1 || exit 1
            .venv/bin/pip install --no-deps --no-build-isolation --ignore-requires-python -e . || exit 1
        fi
    fi
    PY=.venv/bin/python
    D2M=.venv/bin/d2m
fi

if [ "$DEVICE" = "cpu" ]; then
    GPU="cpu"
else
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "torch sees no CUDA device: d2m would silently run on the CPU (set DEVICE=cpu to do that)" >&2; exit 1; }
    INDEX="${DEVICE#cuda:}"
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$INDEX" | head -n 1)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$INDEX" >&2
fi
SLUG="$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
mkdir -p "$RESULTS"
echo "{\"gpu\": \"$GPU\", \"cores\": $(nproc), \"python\": \"$("$PY" -V 2>&1)\", \"torch\": \"$("$PY" -c 'import torch; print(torch.__version__)')\", \"date\": \"$(date -u +%FT%TZ)\"}" >&2

# A config with this run's shards and output folder, READERS reading processes and NWORKERS threads.
tuned() {  # tuned CONFIG [SHARDS] -> path of the copy
    "$PY" - "$1" "${2:-$SHARD_DIR}" "$SCRATCH" "$READERS" "$NWORKERS" "$PRECISION" "$GPU_DECODE" "$COMPILE_CONFIGS" \
        "$GRAPH_CONFIGS" "$DECODE_SHARE" <<'EOF2'
import sys, yaml
from pathlib import Path
name, shards, scratch, readers, nworkers, precision, gpu_decode, compiled, graphed, share = sys.argv[1:]
cfg = yaml.safe_load(Path(f"configs/{name}.yml").read_text())
cfg.update(input_tars=str(Path(shards).resolve() / "*.tar"), output_metadata_dir=f"{scratch}/out-{name}",
           reader_processes=readers if readers == "auto" else int(readers), nworkers=int(nworkers), precision=precision,
           dataset=f"gpu{name}")
if gpu_decode:
    cfg["gpu_decode"] = gpu_decode
if name in compiled.split():
    cfg["torch_compile"] = True
if name in graphed.split():
    cfg["cuda_graphs"] = True
if share:
    cfg["reader_decode_share"] = float(share)
path = Path(scratch) / f"{name}-tuned.yml"
path.write_text(yaml.safe_dump(cfg, sort_keys=False))
print(path)
EOF2
}

stage_shards() {
    compgen -G "$SHARD_DIR/*.tar" >/dev/null && return
    say "making $SHARDS shards of $SAMPLES samples in $SHARD_DIR ($(nproc) processes)"
    step "$D2M" make-shards "$SHARD_DIR" --shards "$SHARDS" --samples "$SAMPLES" --max-side 512 --jpeg-quality 95 \
        --workers "$(nproc)" >/dev/null || status=1
}

stage_bench() {  # end to end in one process, model-only, bf16-vs-fp32 fidelity
    for config in $CONFIGS; do
        say "d2m bench configs/$config.yml (reader_processes $READERS, nworkers $NWORKERS) -> $RESULTS/$SLUG-$config.jsonl"
        step "$D2M" bench --yml "$(tuned "$config")" --shards "$SHARD_DIR" --device "$DEVICE" --precision "$PRECISION" \
            | sed "s/^{/{\"reader_processes\": $READERS_JSON, \"nworkers_set\": $NWORKERS, /" | tee "$RESULTS/$SLUG-$config.jsonl" \
            || status=1
    done
}

run_shards() {  # the folder `d2m run` reads: SHARD_DIR, or RUN_SHARDS links to its tars, in turn
    [ -z "$RUN_SHARDS" ] && { echo "$SHARD_DIR"; return; }
    local dir="$SCRATCH/run-shards" tars i
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir"
        tars=("$(realpath "$SHARD_DIR")"/*.tar)
        for ((i = 0; i < RUN_SHARDS; i++)); do
            ln -s "${tars[i % ${#tars[@]}]}" "$dir/$(printf '%05d' "$i").tar"
        done
    fi
    echo "$dir"
}

stage_run() {  # `d2m run` through Dagster, a fresh instance each, wall time from the command's start to its exit
    : >"$RESULTS/$SLUG-run.jsonl"
    for config in $RUN_CONFIGS; do
        say "d2m run configs/$config.yml through Dagster -> $RESULTS/$SLUG-run.jsonl"
        local yml log start end
        yml="$(tuned "$config" "$(run_shards)")"
        log="$SCRATCH/run-$config.log"
        local smi="$SCRATCH/smi-$config.csv" sampler=""
        mkdir -p "$SCRATCH/dagster-$config"
        : >"$smi"
        if [ "$DEVICE" != "cpu" ]; then  # the GPU's load through the run: busy (utilisation %) or waiting for the CPU
            nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -i "$INDEX" -lms 500 \
                >"$smi" 2>/dev/null &
            sampler=$!
        fi
        start=$(date +%s%N)
        if DAGSTER_HOME="$SCRATCH/dagster-$config" timeout "$STEP_TIMEOUT" "$D2M" run --yml "$yml" >"$log" 2>&1; then
            end=$(date +%s%N)
            grep -v '^progress:' "$log" | tail -n 4 >&2
        else
            end=$(date +%s%N)
            status=1
            tail -n 40 "$log" >&2
        fi
        [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
        "$PY" - "$config" "$(( (end - start) / 1000000 ))" "$GPU" "$READERS" "$NWORKERS" "$log" "$SCRATCH/out-$config" \
            "$COMPILE_CONFIGS" "$GRAPH_CONFIGS" "$DECODE_SHARE" "$(compgen -G "$(run_shards)/*.tar" | wc -l)" "$smi" \
            "$GPU_DECODE" <<'EOF2' | tee -a "$RESULTS/$SLUG-run.jsonl"
import glob, json, re, statistics, sys
config, ms, gpu, readers, nworkers, log, out, compiled, graphed, share, shards, smi, gpu_decode = sys.argv[1:]
from d2m_core.compute.pipeline import reader_processes  # what auto came to in the run
load = [[float(v) for v in line.split(",")] for line in open(smi) if line.count(",") == 1]
busy = sorted(u for u, _ in load)  # utilisation every 0.5 s, start-up and teardown included
gpu_load = {"gpu_util_median": statistics.median(busy), "gpu_util_p90": statistics.quantiles(busy, n=10, method="inclusive")[-1] if len(busy) > 1 else busy[0],
            "gpu_mem_max_mib": max(m for _, m in load), "gpu_samples": len(load)} if load else {}
summary = [l.strip() for l in open(log, errors="replace") if l.startswith("d2m run:")]
found = re.search(r"([\d,]+) samples in", summary[-1]) if summary else None
samples, wall = int(found.group(1).replace(",", "")) if found else 0, int(ms) / 1000
timings = {}  # summed over the shards' {shard}.json: loader_wait_s, decode_s, model_s, total_s
for path in glob.glob(f"{out}/*.json"):
    data = json.load(open(path))
    for key, value in (data.get("timings", {}) if isinstance(data, dict) else {}).items():
        timings[key] = round(timings.get(key, 0.0) + value, 2)
print(json.dumps({"kind": "d2m_run", "config": config, "gpu": gpu, "shards": int(shards), "samples": samples, "wall_s": wall,
                  "samples_per_s": round(samples / wall, 1),
                  "reader_processes": reader_processes(readers, gpu_decode == "readers"),
                  "nworkers": int(nworkers), "torch_compile": config in compiled.split(),
                  "cuda_graphs": config in graphed.split(), "reader_decode_share": float(share or 1),
                  "summary": summary[-1] if summary else None, "shard_timings_s": timings} | gpu_load))
EOF2
    done
}

stage_fastpath() {
    say "device preprocessing path (fidelity vs PIL, images/s) -> $RESULTS/$SLUG-fastpath.jsonl"
    step "$PY" -m d2m_core.reading.fastpath --shards "$SHARD_DIR" --device "$DEVICE" --precision "$PRECISION" \
        --images "$FASTPATH_IMAGES" --batch-size 256 | tee "$RESULTS/$SLUG-fastpath.jsonl" || status=1
}

stage_parts() {
    say "where a batch's time goes -> $RESULTS/$SLUG-parts.jsonl"
    : >"$RESULTS/$SLUG-parts.jsonl"
    for config in $CONFIGS; do
        step "$D2M" bench --stage parts --yml "$(tuned "$config")" --shards "$SHARD_DIR" --device "$DEVICE" \
            --precision "$PRECISION" | tee -a "$RESULTS/$SLUG-parts.jsonl" || status=1
    done
}

stage_loader() {
    say "loader stage -> $RESULTS/$SLUG-loader.jsonl"
    : >"$RESULTS/$SLUG-loader.jsonl"
    for n in $LOADER_PROCESSES; do
        step "$D2M" bench --stage loader --shards "$SHARD_DIR" --processes "$n" ${LOADER_DECODE:+--decode --device $DEVICE} \
            | tee -a "$RESULTS/$SLUG-loader.jsonl" || status=1
    done
}

stage_writer() {
    say "writer stage (this machine's CPU) -> $RESULTS/$SLUG-writer.jsonl"
    : >"$RESULTS/$SLUG-writer.jsonl"
    for config in $CONFIGS; do
        step "$D2M" bench --stage writer --yml "configs/$config.yml" --shards "$SHARD_DIR" | tee -a "$RESULTS/$SLUG-writer.jsonl" \
            || status=1
    done
}

stage_overhead() {  # a run's fixed cost around its work, on this machine (first shard only)
    say "run overhead -> $RESULTS/$SLUG-run-overhead.jsonl"
    : >"$RESULTS/$SLUG-run-overhead.jsonl"
    mkdir -p "$SCRATCH/one-shard"
    ln -sf "$(realpath "$(ls "$SHARD_DIR"/*.tar | head -n 1)")" "$SCRATCH/one-shard/"
    for config in $OVERHEAD_CONFIGS; do
        step "$D2M" bench --stage run-overhead --yml "$(tuned "$config")" --shards "$SCRATCH/one-shard" \
            | tee -a "$RESULTS/$SLUG-run-overhead.jsonl" || status=1
    done
}

stage_tests() {
    say "CUDA tests"
    step "$PY" -m pytest -q -p no:cacheprovider tests/core/test_fastpath.py tests/core/test_compiled.py \
        tests/core/test_engine.py::test_issuing_a_batch_on_cuda_never_waits_for_the_device ${CUDA_TESTS_MORE:-} || status=1
}

for stage in $STAGES; do
    "stage_$stage"
done
say "results in $RESULTS/$SLUG-*.jsonl (exit status $status)"
exit "$status"
