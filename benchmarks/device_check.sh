#!/usr/bin/env bash
# The GPU checks of benchmarks/loop_efficiency.py, as one short script for a lent machine
# whose image has its own jax (never replaced): the packages it lacks travel as wheels in
# .whl/ and go to /tmp/site on PYTHONPATH (see the workplace's device notes).
#   bash benchmarks/device_check.sh   # writes $OUT/*.json and $OUT/log
#   CHECKS="step_cost loop" bash benchmarks/device_check.sh   # a subset of: main, loop,
#     step_cost, recipe, compile, data (all of them take more than one 10-minute call:
#     CHECKS="recipe compile data" ~7 min, CHECKS="main loop" ~6 min on an H200)
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

CHECKS=${CHECKS:-main loop}
for check in $CHECKS; do case $check in
main)
# The README main job as its README command runs it (config defaults: 8 steps per
# dispatch on a GPU), wall clock of the whole command: first on a bare machine
# (MNIST-1D generated, programs compiled), then rerun from scratch (--restart), which
# loads the generated data and the compiled programs from their caches.
export SSE_SAM_JAX_CACHE=/tmp/ssj_cache
main_job() {  # main_job LABEL [ARGS...]
  local label=$1; shift
  TIMEFORMAT="main job$label: %R s wall"
  time (python3 -m sse_sam_jax.cli train --workdir /tmp/main "$@" 2>&1 | grep -vi warn | tail -6)
  python3 -c "import json; t=json.load(open('/tmp/main/results.json')); print(t['timing'], t['test']['all'])"
}
main_job ''
main_job ', rerun' --restart
main_job ', rerun, 1 step per dispatch' --restart --config.steps_per_dispatch=1
# A cold start both ways, each in a fresh workdir (its own compilation cache): the
# default (on a GPU the later programs are built in background threads while the first
# trains) against every program built before step 0.
for threads in -1 0; do
  TIMEFORMAT="main job, cold, background_compile_threads=$threads: %R s wall"
  time (python3 -m sse_sam_jax.cli train --workdir /tmp/main_cold$threads \
        --config.background_compile_threads=$threads 2>&1 | grep -E 'built|throughput')
done
# At 8 steps per dispatch the main job's padding saves no program (2 per stage either
# way) but every step carries the mask: the same cold run unpadded.
TIMEFORMAT="main job, cold, data.pad_last_batch=False: %R s wall"
time (python3 -m sse_sam_jax.cli train --workdir /tmp/main_cold_unpadded \
      --config.data.pad_last_batch=False 2>&1 | grep -E 'built|throughput')

;;
loop)
# Loop efficiency: ResNet-34 (CIFAR stem) b64 SSE-SAM on a CIFAR-shaped .npz with
# augmentation and evaluation every epoch (data wait: augmentation on the device, the
# default, then on the host in 4 grain workers, as measured before data.augment_on);
# then the main job.
timeout 300 python3 benchmarks/loop_efficiency.py --runs resnet,main --resnet-model resnet34_cifar \
  --resnet-batch 64 --resnet-examples 3200 --resnet-epochs 3 \
  --out "$OUT/loop_efficiency_gpu.json"
timeout 200 python3 benchmarks/loop_efficiency.py --runs resnet --resnet-model resnet34_cifar \
  --resnet-batch 64 --resnet-examples 3200 --resnet-epochs 3 --num-workers 4 --augment-on host \
  --out "$OUT/loop_efficiency_gpu_host_augment.json"
;;
step_cost)
# The SAM family and the variants' exact and reuse steps on the paper's recipe
# (ResNet-34 CIFAR stem, batch 64), interleaved, ratios to SGD from one run.
STEP_COST_ONLY=${STEP_COST_ONLY:-sgd,sam,asam,imbsam,sse_sam_stage1,sse_sam_stage2,sse_sam_stage1_reuse,sse_sam_stage2_reuse,focal_sam,shot_sam} \
  timeout 330 python3 benchmarks/step_cost.py --model resnet34_cifar --batch 64 --rounds 10 \
  --out "$OUT/step_cost_gpu.json"
;;
recipe)
# The paper's CIFAR-100-LT recipe end to end (benchmarks/full_recipe.py): 2 epochs at the
# real sizes in float32 and in bfloat16, extrapolated to 200 (targets on an H100-class
# GPU: <= 15 min float32, <= 8 min bfloat16).
for precision in float32 bfloat16; do
  python3 benchmarks/full_recipe.py --epochs 2 --precision "$precision" \
    --out "$OUT/full_recipe_$precision.json" 2>&1 | grep -v -i warn | tail -3
done
;;
compile)
# What each of the recipe's programs costs to build (trace + lower, XLA), cold, with the
# default XLA options and without GPU autotuning, and what a step then costs.
for xla in "" "--xla xla_gpu_autotune_level=0"; do
  timeout 240 python3 benchmarks/compile_cost.py --time-steps 30 $xla \
    --out "$OUT/compile_cost${xla:+_autotune0}.json" 2>&1 | grep -v -i warn
done
;;
data)
# The loop's data path per step on the recipe's data: host augmentation (0 and 4
# workers) against augmentation on the device.
timeout 200 python3 benchmarks/host_batch_cost.py --steps 400 --workers 0,4 \
  --out "$OUT/host_batch_cost.json" 2>&1 | grep -v -i warn
;;
esac; done
