#!/usr/bin/env bash
# Every GPU figure the benchmarks define, on one CUDA GPU, in one command (issue 12, item 4):
#   GAPW double projection on CUDA (bench_warp.py), Depth Anything V2 Small and DepthCrafter at 768x1280
#   (bench_stages.py), SASI at the full Wan2.1-1.3B size with and without the VAE (bench_sasi.py), and the
#   1.3B LoRA training step (bench_train.py); then one markdown table (gpu_table.py).
# Every model is built with random weights at its published size: nothing is downloaded (the hub is set
# offline, so an attempt would fail loudly). Each script writes its JSON under benchmarks/results/; the
# table and the seconds per script go to <date>_<gpu>_gpu-suite.json beside them. Settings are sized to
# finish in under 8 minutes on one H100/H200-class GPU; each script also has a time limit of its own.
#
#   bash benchmarks/gpu_suite.sh            (from the repository root; PYTHON=... to pick the interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one GPU

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    torch_version="$("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA build:', torch.version.cuda)" 2>&1 | tail -1)"
    echo "gpu_suite.sh: no CUDA GPU is visible to PyTorch ($torch_version); these figures need one CUDA GPU. Nothing was run." >&2
    exit 2
fi
"$PYTHON" -c "import torch; print('gpu_suite.sh on', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

log="$(mktemp -d)"
files=()
seconds=()
step() {  # step NAME LIMIT_S SCRIPT ARGS...: run one benchmark script, keep the JSON it wrote
    local name="$1" limit="$2"; shift 2
    local start=$SECONDS
    echo "== $name: $*"
    if ! timeout "$limit" "$PYTHON" "$@" 2>&1 | tee "$log/$name.txt"; then
        echo "gpu_suite.sh: $name failed or ran past ${limit} s (its output: $log/$name.txt)" >&2
        exit 1
    fi
    seconds+=(--seconds "$name=$((SECONDS - start))")
    local wrote
    wrote="$(sed -n 's/^wrote \(.*\.json\)$/\1/p' "$log/$name.txt" | tail -1)"  # write_result's line comes last
    if [ -z "$wrote" ]; then
        echo "gpu_suite.sh: $name wrote no result file (its output: $log/$name.txt)" >&2
        exit 1
    fi
    files+=("$wrote")
}

step warp 40 benchmarks/bench_warp.py --frames 4 --repeats 3 --threads ''  # CUDA only: no CPU rows, no numba compile
step stages 150 benchmarks/bench_stages.py --frames 17 --repeats 2
step sasi 190 benchmarks/bench_sasi.py --device cuda --preset full --repeats 2 --e2e
step train 90 benchmarks/bench_train.py --no-cpu --gpu-steps 5
"$PYTHON" benchmarks/gpu_table.py "${files[@]}" "${seconds[@]}"
