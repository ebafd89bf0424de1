#!/usr/bin/env bash
# FP16 against W8A8 serving on one GPU: start `smoothserve serve` on random weights at a real OPT shape,
# in FP16, in W8A8 and in W8A8 with an int8 KV cache (VARIANTS="fp16 w8a8" leaves that one out), drive each
# with the same load (`smoothserve bench`: input 512, output 128,
# Poisson arrivals at rising rates up to saturation), and write serving-<device>.{json,md} and the plots.
#   bash benchmarks/serving_compare.sh [shape]        # default opt-13b; OUT (default benchmarks/results)
#   RATES=1,4,8,16,32,inf NUM_PROMPTS=200 bash benchmarks/serving_compare.sh
# Needs the built extension and a GPU. Random weights: throughput and latency are real, the text is not.
set -euo pipefail
SHAPE=${1:-opt-13b}
OUT=${OUT:-benchmarks/results}
RATES=${RATES:-1,4,8,16,32,inf}
NUM_PROMPTS=${NUM_PROMPTS:-200}
PORT=${PORT:-8123}
# PROFILE_SERVER=1: sample each server with py-spy while it is under load (py-spy on PATH), into
# serving-<variant>/pyspy.txt (`python -m benchmarks.pyspy_summary` reads it).
PROFILE_SERVER=${PROFILE_SERVER:-}
# The CLI: the installed `smoothserve`, or (an in-place build, as benchmarks/device_check.sh makes) the module.
read -r -a SMOOTHSERVE <<< "${SMOOTHSERVE:-smoothserve}"
work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# A tokenizer for the random model (the weights never come from this directory).
"${SMOOTHSERVE[@]}" make-tiny-model "$work/tokenizer" > "$work/make-tiny-model.log" 2>&1

VARIANTS=${VARIANTS:-fp16 w8a8 w8a8-kv8}
for variant in $VARIANTS; do
    args=(--model "random:$SHAPE" --load-format random --tokenizer "$work/tokenizer" --dtype float16
          --port "$PORT" --max-num-seqs 256 --served-model-name "$SHAPE-$variant")
    case $variant in
        w8a8) args+=(--quantization w8a8) ;;
        w8a8-kv8) args+=(--quantization w8a8 --kv-cache-dtype int8) ;;
    esac
    "${SMOOTHSERVE[@]}" serve "${args[@]}" > "$OUT/serve-$variant.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 600); do  # loading, quantizing, CUDA graph capture
        curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null && break
        kill -0 "$server_pid" 2>/dev/null || { tail -30 "$OUT/serve-$variant.log"; exit 1; }
        sleep 1
    done
    spy_pid=
    if [ -n "$PROFILE_SERVER" ] && command -v py-spy > /dev/null; then
        mkdir -p "$OUT/serving-$variant"
        py-spy record -p "$server_pid" -f raw -o "$OUT/serving-$variant/pyspy.txt" --threads --idle -r 100 \
            --nonblocking > "$OUT/serving-$variant/pyspy.log" 2>&1 &
        spy_pid=$!
    fi
    "${SMOOTHSERVE[@]}" bench --url "http://127.0.0.1:$PORT" --dataset random --input-len 512 --output-len 128 \
        --request-rate "$RATES" --num-prompts "$NUM_PROMPTS" --server-metrics --out "$OUT/serving-$variant"
    if [ -n "$spy_pid" ]; then kill -INT "$spy_pid"; wait "$spy_pid" || true; fi
    # Where the engine's steps spent their time under that load (serving_report reads it).
    curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/serving-$variant/metrics.txt" || true
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=
done

device=$(python3 -c "import torch; print(torch.cuda.get_device_name())")
extra=()
[ -e "$OUT/serving-w8a8-kv8/bench.json" ] && extra=(--w8a8-kv8 "$OUT/serving-w8a8-kv8")
python3 -m benchmarks.serving_report --fp16 "$OUT/serving-fp16" --w8a8 "$OUT/serving-w8a8" "${extra[@]}" \
    --device-name "$device" --model "$SHAPE" --out "$OUT"
