#!/usr/bin/env bash
# One device call: build the extension, then the stages named (default: tests kernels).
#   bash benchmarks/device_check.sh [tests] [kernels] [latency] [fidelity] [serving] [profile] [pytest]
# (profile: benchmarks/profile_step.py once per '|'-separated argument list in $PROFILE_ARGS;
#  pytest: python -m pytest $PYTEST_ARGS). Everything written ends in $OUT/results.tgz at the end.
# Needs the nvidia-cutlass wheel (and the server's wheels) in .whl/ (carried). Logs, results and the
# built .so (gzipped, with the stamp of its sources: copy both into engine/ and carry them into the next
# call) go to $OUT. DEADLINE (seconds, default 570) bounds
# the whole call: each stage gets what is left, so a slow stage cannot eat the output of the others.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # py-spy, where its wheel was carried
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

call_start=$(date +%s)
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - call_start) )); }
start=$(date +%s)
# A carried build (engine/_C*.so.gz with engine/_C.stamp, both from an earlier call's $OUT) is used only
# if it was built from these very sources; otherwise the extension is built again.
sources=$(find csrc setup.py -type f | sort | xargs cat | sha1sum | cut -d' ' -f1)
if [ "$(cat engine/_C.stamp 2>/dev/null)" = "$sources" ]; then
    for gz in engine/_C*.so.gz; do [ -e "$gz" ] && gunzip -kf "$gz"; done
else
    rm -f engine/_C*.so engine/_C*.so.gz
fi
if ! ls engine/_C*.so >/dev/null 2>&1; then
    MAX_JOBS=16 SMOOTHSERVE_BUILD_EXT=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { tail -60 "$OUT/build.log"; exit 1; }
fi
for so in engine/_C*.so; do gzip -1c "$so" > "$OUT/$(basename "$so").gz"; done
echo "$sources" > "$OUT/_C.stamp"
echo "build: $(( $(date +%s) - start )) s"

stages=${*:-tests kernels}
for stage in $stages; do
    start=$(date +%s)
    budget=$(left)
    [ "$budget" -gt 20 ] || { echo "$stage: skipped, no time left"; continue; }
    run() { timeout -k 10 "$budget" "$@"; }
    case $stage in
        tests) run python3 -m pytest -q -m gpu tests/test_*gpu*.py -p no:cacheprovider --timeout 300 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
        kernels) run python3 -m benchmarks.kernels --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -20 ;;
        latency) run python3 -m benchmarks.latency --out "$OUT" 2>&1 | tee "$OUT/latency.log" | tail -40 ;;
        fidelity) run python3 -m benchmarks.fidelity --out "$OUT" 2>&1 | tee "$OUT/fidelity.log" | tail -30 ;;
        # Rates and request counts that fit one call beside the other stages (the script's own defaults
        # take far longer); each server's /metrics comes back in its serving-<variant>/ folder.
        serving) OUT="$OUT" SMOOTHSERVE="python3 -m engine.cli" RATES=${RATES:-4,8,inf} NUM_PROMPTS=${NUM_PROMPTS:-96} PROFILE_SERVER=1 run bash benchmarks/serving_compare.sh 2>&1 | tee "$OUT/serving.log" | tail -30
                 for spy in "$OUT"/serving-*/pyspy.txt; do [ -e "$spy" ] && python3 -m benchmarks.pyspy_summary "$spy"; done ;;
        pytest) run python3 -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee -a "$OUT/pytest.log" | tail -40 ;;
        profile) IFS='|' read -ra runs <<< "${PROFILE_ARGS:-}"
                 for a in "${runs[@]:-}"; do run python3 -m benchmarks.profile_step $a 2>&1 | tee -a "$OUT/profile.log"; done ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
    echo "$stage: $(( $(date +%s) - start )) s"
done

# At most 8 files come back from a device call: everything goes into one archive, beside which the
# built .so and the reports' markdown stay readable as they are.
archive=$(mktemp -d)/results.tgz
( cd "$OUT" && tar czf "$archive" --exclude='*.so.gz' . \
    && find . -mindepth 1 -type f ! -name '*.so.gz' ! -name '_C.stamp' ! -name '*.md' -delete \
    && find . -mindepth 2 -name '*.md' -delete && find . -mindepth 1 -type d -empty -delete \
    && mv "$archive" results.tgz )
ls "$OUT"
