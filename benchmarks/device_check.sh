#!/usr/bin/env bash
# Accelerator check (<= 8 minutes on one GPU): bfloat16 training images/s per chip and MFU for ir_50 and
# ir_101 at the recipe batch per chip (the original's 512 over 2 GPUs = 256), peak memory, forward images/s,
# and the input pipeline's images/s on the host cores (only when TensorFlow imports).
#
#     bash benchmarks/device_check.sh
#
# Needs JAX (with the accelerator), flax, optax, orbax-checkpoint (and PyTorch for nothing on this path);
# no TensorFlow, no ml_collections, no network: the training path builds its config without ml_collections
# when that is missing (benchmarks/device_train_mfu.py) and never imports TensorFlow.
# Settings (environment):
#   DEVICE_CHECK_ARCHS    archs to time            (default "ir_50 ir_101")
#   DEVICE_CHECK_BATCH    batch per chip           (default 256)
#   DEVICE_CHECK_CLASSES  classifier classes       (default 85742, MS1MV2)
#   DEVICE_CHECK_STEPS    timed steps per arch     (default 20; 3 warm-up steps first)
#   DEVICE_CHECK_EXTRA    extra flags for device_train_mfu.py (e.g. "--width 8 --image-size 32 --peak-tflops 0.1")
#   DEVICE_CHECK_TIMEOUT  seconds per arch         (default 200)
#   DEVICE_CHECK_PIPELINE 0 skips the input pipeline part
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
ARCHS="${DEVICE_CHECK_ARCHS:-ir_50 ir_101}"
BATCH="${DEVICE_CHECK_BATCH:-256}"
CLASSES="${DEVICE_CHECK_CLASSES:-85742}"
STEPS="${DEVICE_CHECK_STEPS:-20}"
EXTRA="${DEVICE_CHECK_EXTRA:-}"
TIMEOUT="${DEVICE_CHECK_TIMEOUT:-200}"
status=0

echo "== device check: $(python3 -c 'import jax; d = jax.devices(); print(len(d), "x", d[0].device_kind, "(" + jax.default_backend() + ")")')"
for arch in $ARCHS; do
    echo "== train step: $arch, batch $BATCH per chip, $CLASSES classes"
    # shellcheck disable=SC2086
    if ! timeout "$TIMEOUT" python3 benchmarks/device_train_mfu.py --arch "$arch" --per-chip-batch "$BATCH" \
            --num-classes "$CLASSES" --steps "$STEPS" --warmup 3 --precision bfloat16 --forward $EXTRA; then
        echo "$arch: FAILED (or over ${TIMEOUT} s)"
        status=1
    fi
done

echo "== input pipeline (host cores: $(nproc))"
if [ "${DEVICE_CHECK_PIPELINE:-1}" = "0" ]; then
    echo "input pipeline: skipped: DEVICE_CHECK_PIPELINE=0"
elif python3 -c "import tensorflow" >/dev/null 2>&1; then
    timeout 150 python3 benchmarks/bench_input_pipeline.py --images 1000 --cores "$(nproc)" --batches 10 \
        || echo "input pipeline: FAILED"
else
    echo "input pipeline: skipped: no TensorFlow"
fi
exit $status
