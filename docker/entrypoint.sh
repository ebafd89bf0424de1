#!/bin/sh
# The container's entrypoint: turns SMOOTHSERVE_* environment variables into `smoothserve serve` flags
# (the CLI reads only SMOOTHSERVE_API_KEY itself), then execs the server so that it is PID 1 and gets
# SIGTERM directly. Arguments given to the container are appended and win over the environment.
#   SMOOTHSERVE_MODEL           hub name (facebook/opt-13b) or a directory           (required)
#   SMOOTHSERVE_QUANTIZATION    w8a8 to quantize an FP16 checkpoint in memory; empty serves it as stored
#   SMOOTHSERVE_HOST / _PORT    where to listen (default 0.0.0.0:8000)
#   SMOOTHSERVE_API_KEY         require this bearer key (read by the server)
#   SMOOTHSERVE_MAKE_TINY_MODEL 1: first write a tiny random OPT model to SMOOTHSERVE_MODEL if it has none
set -eu

model="${SMOOTHSERVE_MODEL:?set SMOOTHSERVE_MODEL to a hub name such as facebook/opt-13b or a model directory}"
if [ "${SMOOTHSERVE_MAKE_TINY_MODEL:-0}" = 1 ] && [ ! -f "$model/config.json" ]; then
    smoothserve make-tiny-model "$model" --train-steps "${SMOOTHSERVE_TINY_TRAIN_STEPS:-0}"
fi

# Prepended in reverse order, so that the container's own arguments come last.
set -- --host "${SMOOTHSERVE_HOST:-0.0.0.0}" --port "${SMOOTHSERVE_PORT:-8000}" "$@"
if [ -n "${SMOOTHSERVE_QUANTIZATION:-}" ]; then
    set -- --quantization "$SMOOTHSERVE_QUANTIZATION" "$@"
fi
set -- --model "$model" "$@"
exec smoothserve serve "$@"
