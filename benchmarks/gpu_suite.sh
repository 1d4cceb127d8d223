#!/usr/bin/env bash
# The real-size benchmarks for a lent GPU, in one call of at most about 8 minutes, into one results file
# that benchmarks/RESULTS.md quotes:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # on the GPU machine: writes OUT_DIR/gpu_suite.md
#   bash benchmarks/gpu_suite.sh --smoke OUT_DIR    # the same chain on the CPU with tiny sizes (a check)
# Sections: the machine; reference encoding at Qwen2-VL-2B size, N = 1..28, ours vs the release's
# computation (bf16; one vision call and one image per call); the SDXL UNet at 1024 px, 30 steps, fp16
# and bf16, plain vs adapter vs adapter with K/V once per call; the same under torch.compile; parameter
# memory. Each section has its own time limit, so one slow section cannot take the rest with it.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT_DIR="${1:-${OUT:-benchmarks}}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_suite.md"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if [ "$SMOKE" = 1 ]; then
    ENCODE=(--sizes 1 2 --repeats 1 --warmup 0)
    UNET=(--steps 2 --repeats 1 --warmup 0 --unet-repeats 1)
    LIMIT=120
else
    ENCODE=(--real-config --device cuda --dtype bfloat16 --sizes 1 2 4 8 16 28 --repeats 5)
    UNET=(--real-config --device cuda --sample-size 128 --steps 30 --repeats 3)
    LIMIT=150
fi

section() {  # title, time limit in s, command...
    local title=$1 limit=$2
    shift 2
    printf '\n## %s\n\nCommand: `%s`\n\n' "$title" "$*" >>"$RESULTS"
    local started=$SECONDS
    if timeout "$limit" "$@" >>"$RESULTS" 2>>"$RESULTS.log"; then
        printf '\n(%d s)\n' $((SECONDS - started)) >>"$RESULTS"
    else
        printf '\nFAILED or over %d s (exit %d); the log is in %s\n' "$limit" $? "$RESULTS.log" >>"$RESULTS"
    fi
}

{
    echo "# GPU suite: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} >"$RESULTS"
: >"$RESULTS.log"

section "Reference encoding, one vision call for every image" "$LIMIT" \
    "$PY" benchmarks/encode_scaling.py "${ENCODE[@]}" --vision-batch-size all
section "Reference encoding, one image per vision call" "$LIMIT" \
    "$PY" benchmarks/encode_scaling.py "${ENCODE[@]}" --vision-batch-size 1
if [ "$SMOKE" = 1 ]; then
    section "Generation, EasyRef over plain SDXL (tiny models)" "$LIMIT" "$PY" benchmarks/overhead.py "${UNET[@]}"
else
    section "SDXL UNet, float16" "$LIMIT" "$PY" benchmarks/overhead.py "${UNET[@]}" --dtype float16
    section "SDXL UNet, bfloat16" "$LIMIT" "$PY" benchmarks/overhead.py "${UNET[@]}" --dtype bfloat16
    section "SDXL UNet, bfloat16, torch.compile" "$LIMIT" "$PY" benchmarks/overhead.py "${UNET[@]}" --dtype bfloat16 --compile
fi
section "Encoder parameter memory at the real size" 60 "$PY" benchmarks/encoder_memory.py
echo "wrote $RESULTS"
