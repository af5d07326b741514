#!/usr/bin/env bash
# The GPU checks of benchmarks/loop_efficiency.py, as one short script for a lent machine
# whose image has its own jax (never replaced): the packages it lacks travel as wheels in
# .whl/ and go to /tmp/site on PYTHONPATH (see the workplace's device notes).
#   bash benchmarks/device_check.sh   # writes $OUT/*.json and $OUT/log
set -uo pipefail
OUT=${OUT:-/tmp/device_check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi -L
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__)'

# README main job, wall clock of the command: 8 steps per dispatch, then its rerun from
# scratch (--restart) on the persistent cache of a shared directory; then 1 per dispatch.
main_job() {  # main_job K LABEL [ARGS...]
  local k=$1 label=$2; shift 2
  TIMEFORMAT="main job k=$k$label: %R s wall"
  time (python3 -m sse_sam_jax.cli train --workdir /tmp/main_k$k --config.steps_per_dispatch=$k \
    --config.compilation_cache_dir=/tmp/cache_k$k "$@" 2>&1 | grep -vi warn | tail -9)
}
main_job 8 ''
main_job 8 ', rerun' --restart
main_job 1 ''
for k in 8 1; do
  python3 -c "import json; t=json.load(open('/tmp/main_k$k/results.json')); print('k=$k', t['timing'], t['test']['all'])"
done

# Loop efficiency: ResNet-34 b64 SSE-SAM on a CIFAR-shaped .npz (one step per dispatch),
# and the main job (8 steps per dispatch).
timeout 300 python3 benchmarks/loop_efficiency.py --runs resnet --resnet-model resnet34 \
  --resnet-batch 64 --resnet-examples 3200 --resnet-epochs 2 --num-workers 4 \
  --steps-per-dispatch 1 --out "$OUT/loop_efficiency_gpu_resnet34.json"
timeout 200 python3 benchmarks/loop_efficiency.py --runs main --steps-per-dispatch 8 \
  --out "$OUT/loop_efficiency_gpu_main.json"
