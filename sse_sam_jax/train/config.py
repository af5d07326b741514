"""The training config (``ml_collections``), its defaults and its validation.

The default is the offline long-tailed benchmark: MNIST-1D-LT (IF 100,
``iid_noise_scale`` 0.07), the 1D CNN, 40 epochs, batch 128, SSE-SAM
(rho_head 0.05, rho_tail 0.1, gamma 0.7, tail = fewer than 1000 examples),
SGD momentum 0.9, lr 0.05 with the references' epoch cosine, wd 5e-4.
"""

from __future__ import annotations

import ml_collections

from sse_sam_jax import losses as losses_lib
from sse_sam_jax.models import MODELS
from sse_sam_jax.models.small import INITS as MODEL_INITS
from sse_sam_jax.optim import NORMALIZATIONS
from sse_sam_jax.train.compiled_step import CPU_CONVOLUTIONS
from sse_sam_jax.train.device_images import AUGMENT_ON
from sse_sam_jax.train.schedules import SCHEDULES
from sse_sam_jax.train.sharding import PARAMETER_SHARDINGS
from sse_sam_jax.train.step import RUNNING_STATS

DATASETS = ('mnist1d', 'cifar10', 'cifar100', 'npz', 'imagenet_lt', 'inaturalist2018')
PERTURBATION_SCOPES = ('global', 'per_device', 'microbatch')
OPTIMIZERS = ('sgd', 'sam', 'asam', 'imbsam', 'group_sam', 'sse_sam', 'sam_then_imbsam',
              'shot_sam', 'focal_sam')
BASE_OPTIMIZERS = ('sgd', 'nesterov', 'adamw')
COMPUTE_DTYPES = ('float32', 'bfloat16')
PARAM_DTYPES = ('float32', 'float64')


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.epochs = 40
  c.data = ml_collections.ConfigDict(dict(
      name='mnist1d', imbalance_factor=100.0, profile='exp', selection='shuffle',
      iid_noise_scale=0.07, num_samples=62500, n_max=5000, val_fraction=0.0,
      # mnist1d only: a balanced validation split of this many freshly generated examples
      # (another generator seed), instead of a share of the long-tailed train set.
      val_generated=0, data_dir='', npz_path='',
      # 'npz': the number of classes (0: max(label) + 1, refused when far above the
      # number of distinct labels, which is a labelling mistake more often than not)
      num_classes=0,
      train_list='', test_list='', image_size=224,
      batch_size=128, drop_remainder=False, num_workers=0, augment=False, shots='mnist1d',
      # the epoch's last, partial, batch padded to a full one in the full batch's program
      # (one program per stage, not two); BatchNorm statistics, losses and metrics cover
      # its real examples only: the same step, to float rounding (sse_sam_jax.models.masking)
      pad_last_batch=True,
      # batches made ahead of the loop, in as many threads (per worker process with
      # num_workers > 0); 0: each batch is made in the loop's thread when it is due
      prefetch_batches=2,
      # a .npy [epochs, N] of training-example indices: epoch e's order, instead of the
      # seeded shuffle (a fixed order for debugging, or a reference's order to replay)
      batch_order='',
      # where augmentation runs: 'host' (grain), 'device' (the training images held on
      # every device, the host sends indices and random draws), 'auto' (the device when
      # the images are in memory, up to 2 GiB); the same batches either way
      augment_on='auto'))
  # running_stats: BatchNorm running statistics from the 'clean' pass (default), from
  # the step's 'last_perturbed' pass, or from 'every_pass' as the authors' PyTorch loop
  # keeps them (every forward pass folded in, in the reference's order, unbiased variance).
  # init: 'flax' (Flax's defaults: LeCun-normal dense kernels, zero biases) or 'torch'
  # (PyTorch's: every kernel and bias uniform in +-1/sqrt(fan_in)); conv1d and mlp only.
  # compute_dtype: 'float32' (everything in float32), or 'bfloat16': convolutions and
  # dense layers in bfloat16, BatchNorm, the loss, parameters and optimizer in float32.
  # param_dtype: 'float64' runs parameters, data and every computation in float64 (JAX's
  # x64 mode; for replaying float64 references). init_from: an .npz of initial
  # parameters and BatchNorm statistics (sse_sam_jax.models.save_weights) instead of
  # the seeded initialisation.
  c.model = ml_collections.ConfigDict(dict(name='conv1d', normed_classifier=False,
                                           running_stats='clean', init='flax',
                                           compute_dtype='float32', param_dtype='float32',
                                           init_from=''))
  c.loss = ml_collections.ConfigDict(dict(
      name='ce', drw_epoch=-1, drw_beta=0.9999, ldam_max_margin=0.5, ldam_scale=30.0,
      tau=1.0, vs_gamma=0.2,
      # True: every example's loss x B / (its head/tail group's size in the batch), the
      # group-normalised loss for any optimizer (SGD on it = ImbSAM with radius 0).
      group_normalised=False))
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sse_sam', rho=0.05, head_rho=0.05, tail_rho=0.1, gamma=0.7, eta=1000.0,
      normalization='batch', tail_weight=1.0,
      # the base optimizer: 'sgd' (heavy ball, the references'), 'nesterov' or 'adamw'
      base='sgd', lr=0.05, schedule='cosine', warmup_epochs=0, momentum=0.9,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=5e-4,
      clip_norm=0.0,  # > 0: clip the sharpness-aware direction to this global norm
      # ASAM's ascent step (Kwon et al. 2021) for any SAM-family name ('asam': SAM's);
      # its published radius is rho = 0.5 (SAM's 0.05).
      adaptive=False, adaptive_eta=0.01,
      # Cheaper steps (sse_sam_jax.optim.sharpness_reuse): the perturbed passes on every
      # `sharpness_every`-th step (and on a random `sharpness_fraction` of those), LookSAM
      # reuse of the sharpness component with weight `sharpness_alpha`
      # in between ('looksam': the reused component's norm is alpha x the gradient's;
      # 'measured': its size relative to the gradient on the last sharpness step, x alpha).
      sharpness_every=1, sharpness_fraction=1.0, sharpness_alpha=0.7,
      sharpness_scale='looksam',
      # 'shot_sam': one radius per shot group (Many, Medium, Few), one perturbed pass each.
      shot_rhos=(0.05, 0.075, 0.1),
      # 'focal_sam' (Li et al. 2025): sharpness weighted by (1 - class share)^gamma, radius rho.
      focal_lambda=1.0, focal_gamma=1.0))
  c.eval = ml_collections.ConfigDict(dict(
      flip_tta=False, every_epochs=10, select_on='none', batch_size=1000))
  c.checkpoint = ml_collections.ConfigDict(dict(every_epochs=5, keep=2))
  # Head/tail Hessian extremes recorded during training (0: off); cheap settings.
  c.hessian = ml_collections.ConfigDict(dict(every_epochs=0, max_examples=1024,
                                             lanczos_iters=12, seed=0))
  c.log_every_steps = 25
  # Consecutive batches of the full shape (a padded last batch included) run in one
  # compiled program (lax.scan) per dispatch: for small models, whose steps are shorter
  # than the host's work per step. 1: one step each; 0 (auto): 1 on CPUs (where it gained
  # nothing); on GPUs and TPUs the divisor of the epoch's steps nearest 8 in 4..16 (one
  # program per stage), else 8 (dispatch.steps_per_dispatch).
  c.steps_per_dispatch = 0
  c.num_devices = 0  # 0: all local devices
  # 'global': the perturbation of the whole batch (what one device computes);
  # 'per_device': every device perturbs from its own shard (m-sharpness), via shard_map;
  # 'microbatch': every run of perturbation_microbatch consecutive examples is perturbed
  # on its own (m-sharpness with ghost BatchNorm), the same on any device count.
  c.perturbation_scope = 'global'
  c.perturbation_microbatch = 0
  # 'replicated' or 'fsdp': arrays of >= fsdp_min_elements split over the devices.
  c.parameter_sharding = 'replicated'
  c.fsdp_min_elements = 2 ** 14
  # JAX's persistent compilation cache: 'workdir' (<workdir>/compilation_cache), a path,
  # or '' (off). A rerun or resume then loads its compiled programs; the train step's
  # are kept serialized in its executables/ (loaded without tracing; local paths only).
  c.compilation_cache_dir = 'workdir'
  # Threads that build the train step's later programs (the last partial batch's, the
  # next stage's) while the first one trains; 0: every program before step 0; -1 (auto):
  # 0 on CPUs, whose cores the step needs (the main job on 2 cores: 60-64 s wall with
  # one thread against 58-62 s without), and min(4, host cores // 4) on GPUs and TPUs.
  c.background_compile_threads = -1
  # Which library runs the train step's convolutions on XLA:CPU: 'eigen' (XLA's default
  # less its YNNPACK convolutions; their weight gradients ran ~1.6x slower in a ResNet-32
  # step) or 'ynnpack' (XLA's default). Dots and reductions stay on YNNPACK; other
  # backends are unaffected.
  c.cpu_convolutions = 'eigen'
  return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """The config a workdir's ``config.json`` was saved from: the defaults with its values
  (lists back to tuples where the default is a tuple; keys it lacks keep the defaults)."""
  c = default_config()

  def update(node, values, prefix=''):
    for key, value in values.items():
      if key not in node:
        continue  # a key this version no longer has
      if hasattr(node[key], 'items') and isinstance(value, dict):
        update(node[key], value, f'{prefix}{key}.')
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) else value

  update(c, saved)
  return c

def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` with a clear message on a bad value; called before any compile."""
  def check(ok, msg):
    if not ok:
      raise ValueError(f'config: {msg}')
  check(int(c.epochs) == c.epochs and c.epochs >= 1, f'epochs must be an integer >= 1, got '
        f'{c.epochs}.')
  check(c.model.compute_dtype in COMPUTE_DTYPES, f'model.compute_dtype must be one of '
        f'{COMPUTE_DTYPES}, got {c.model.compute_dtype!r}.')
  check(c.model.param_dtype in PARAM_DTYPES, f'model.param_dtype must be one of '
        f'{PARAM_DTYPES}, got {c.model.param_dtype!r}.')
  check(c.model.param_dtype == 'float32' or c.model.compute_dtype == 'float32',
        "model.param_dtype='float64' computes in float64; it takes no "
        "model.compute_dtype='bfloat16'.")
  check(c.data.name in DATASETS, f'unknown dataset {c.data.name!r}; choose one of {DATASETS}.')
  check(c.model.name in MODELS, f'unknown model {c.model.name!r}; choose one of {MODELS}.')
  check(c.loss.name in losses_lib.LOSSES,
        f'unknown loss {c.loss.name!r}; choose one of {losses_lib.LOSSES}.')
  o = c.optimizer
  check(o.name in OPTIMIZERS, f'unknown optimizer {o.name!r}; choose one of {OPTIMIZERS}.')
  check(o.schedule in SCHEDULES, f'unknown schedule {o.schedule!r}; choose one of {SCHEDULES}.')
  check(o.base in BASE_OPTIMIZERS,
        f'unknown optimizer.base {o.base!r}; choose one of {BASE_OPTIMIZERS}.')
  check(int(o.warmup_epochs) == o.warmup_epochs and 0 <= o.warmup_epochs < c.epochs,
        f'optimizer.warmup_epochs must be an integer in [0, epochs), got {o.warmup_epochs}.')
  check(o.clip_norm >= 0, f'optimizer.clip_norm must be >= 0 (0: off), got {o.clip_norm}.')
  check(0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps > 0,
        'optimizer.b1 and optimizer.b2 must lie in [0, 1) and optimizer.eps be > 0.')
  check(o.normalization in NORMALIZATIONS,
        f'optimizer.normalization must be one of {NORMALIZATIONS}, got {o.normalization!r}.')
  check(o.lr > 0, f'optimizer.lr must be > 0, got {o.lr}.')
  check(o.weight_decay >= 0, f'optimizer.weight_decay must be >= 0, got {o.weight_decay}.')
  check(0 <= o.momentum < 1, f'optimizer.momentum must lie in [0, 1), got {o.momentum}.')
  for name in ('rho', 'head_rho', 'tail_rho'):
    check(o[name] >= 0, f'optimizer.{name} must be >= 0, got {o[name]}.')
  check(0.0 <= o.gamma <= 1.0, f'optimizer.gamma must lie in [0, 1], got {o.gamma}.')
  check(o.eta > 0, f'optimizer.eta must be > 0, got {o.eta}.')
  check(o.tail_weight >= 0, f'optimizer.tail_weight must be >= 0, got {o.tail_weight}.')
  check(0 <= o.adaptive_eta < float('inf'),
        f'optimizer.adaptive_eta must be finite and >= 0, got {o.adaptive_eta}.')
  check(int(o.sharpness_every) == o.sharpness_every and o.sharpness_every >= 1,
        f'optimizer.sharpness_every must be an integer >= 1, got {o.sharpness_every}.')
  check(0 < o.sharpness_fraction <= 1,
        f'optimizer.sharpness_fraction must lie in (0, 1], got {o.sharpness_fraction}.')
  check(0 <= o.sharpness_alpha < float('inf'),
        f'optimizer.sharpness_alpha must be finite and >= 0, got {o.sharpness_alpha}.')
  check(o.sharpness_scale in ('looksam', 'measured'),
        f"optimizer.sharpness_scale must be 'looksam' or 'measured', got {o.sharpness_scale!r}.")
  check(len(o.shot_rhos) == 3 and all(0 <= r < float('inf') for r in o.shot_rhos),
        f'optimizer.shot_rhos must be 3 radii >= 0 (Many, Medium, Few), got {o.shot_rhos}.')
  check(o.focal_lambda >= 0 and o.focal_gamma >= 0,
        'optimizer.focal_lambda and optimizer.focal_gamma must be >= 0.')
  check(c.model.running_stats in RUNNING_STATS,
        f'model.running_stats must be one of {RUNNING_STATS}, got {c.model.running_stats!r}.')
  reuse = o.sharpness_every > 1 or o.sharpness_fraction < 1
  check(not (reuse and c.model.running_stats == 'every_pass'),
        "model.running_stats='every_pass' follows the references' passes, which have no "
        'cheaper sharpness steps (optimizer.sharpness_every / sharpness_fraction).')
  check(not (reuse and c.model.running_stats == 'last_perturbed' and c.steps_per_dispatch > 1),
        "model.running_stats='last_perturbed' with cheaper sharpness steps needs "
        'steps_per_dispatch=1 (the kind of every step is then chosen on the host).')
  check(int(c.epochs) == c.epochs and c.epochs >= 1, 'epochs must be an integer >= 1.')
  check(c.data.batch_size >= 1, f'data.batch_size must be >= 1, got {c.data.batch_size}.')
  check(int(c.data.num_classes) >= 0, f'data.num_classes must be >= 0, got {c.data.num_classes}.')
  check(c.data.augment_on in AUGMENT_ON,
        f'data.augment_on must be one of {AUGMENT_ON}, got {c.data.augment_on!r}.')
  check(int(c.data.prefetch_batches) == c.data.prefetch_batches and c.data.prefetch_batches >= 0,
        f'data.prefetch_batches must be an integer >= 0, got {c.data.prefetch_batches}.')
  check(c.data.imbalance_factor >= 1,
        f'data.imbalance_factor must be >= 1, got {c.data.imbalance_factor}.')
  check(0 <= c.data.val_fraction < 1, 'data.val_fraction must lie in [0, 1).')
  check(int(c.data.val_generated) == c.data.val_generated and c.data.val_generated >= 0,
        f'data.val_generated must be an integer >= 0, got {c.data.val_generated}.')
  check(not c.data.val_generated or (c.data.name == 'mnist1d' and not c.data.val_fraction),
        'data.val_generated is for mnist1d and excludes data.val_fraction.')
  check(not (c.loss.group_normalised and o.normalization == 'group'),
        "loss.group_normalised with optimizer.normalization='group' normalises twice; the "
        "group methods with normalization='batch' on the group-normalised loss are already "
        "their 'group' form.")
  check(c.model.init in MODEL_INITS, f'model.init must be one of {MODEL_INITS}, got '
        f'{c.model.init!r}.')
  check(c.model.init == 'flax' or c.model.name in ('conv1d', 'mlp'),
        f"model.init='torch' is available for conv1d and mlp, not {c.model.name!r}.")
  check(c.eval.select_on in ('none', 'val', 'test'),
        "eval.select_on must be 'none', 'val' or 'test' (test-set selection is what the "
        "references do; use it only knowingly).")
  check(c.eval.select_on != 'val' or c.data.val_fraction > 0 or c.data.val_generated > 0,
        "eval.select_on='val' needs data.val_fraction > 0 or data.val_generated > 0.")
  check(c.data.name != 'npz' or c.data.npz_path, "data.name='npz' needs data.npz_path.")
  check(c.data.name != 'imagenet_lt' or (c.data.train_list and c.data.test_list),
        "data.name='imagenet_lt' needs data.train_list and data.test_list (the ImageNet-LT "
        "split files ImageNet_LT_train.txt / ImageNet_LT_test.txt).")
  check(c.perturbation_scope in PERTURBATION_SCOPES,
        f'perturbation_scope must be one of {PERTURBATION_SCOPES}, got {c.perturbation_scope!r}.')
  micro = c.perturbation_scope == 'microbatch'
  check(int(c.perturbation_microbatch) == c.perturbation_microbatch
        and (c.perturbation_microbatch >= 1 if micro else c.perturbation_microbatch == 0),
        "perturbation_microbatch must be an integer >= 1 with perturbation_scope='microbatch' "
        f'and 0 otherwise, got {c.perturbation_microbatch}.')
  check(not micro or c.data.batch_size % c.perturbation_microbatch == 0,
        f'perturbation_microbatch={c.perturbation_microbatch} does not divide '
        f'data.batch_size={c.data.batch_size}.')
  check(c.parameter_sharding in PARAMETER_SHARDINGS,
        f'parameter_sharding must be one of {PARAMETER_SHARDINGS}, got {c.parameter_sharding!r}.')
  check(c.fsdp_min_elements >= 1, 'fsdp_min_elements must be >= 1.')
  check(c.cpu_convolutions in CPU_CONVOLUTIONS,
        f'cpu_convolutions must be one of {CPU_CONVOLUTIONS}, got '
        f'{c.cpu_convolutions!r}.')
  check(int(c.background_compile_threads) == c.background_compile_threads
        and c.background_compile_threads >= -1,
        'background_compile_threads must be an integer >= 0 (0: every program before step '
        f'0) or -1 (auto), got {c.background_compile_threads}.')
  check(int(c.steps_per_dispatch) == c.steps_per_dispatch and c.steps_per_dispatch >= 0,
        f'steps_per_dispatch must be an integer >= 0 (0: auto), got {c.steps_per_dispatch}.')
  check(c.hessian.every_epochs >= 0 and c.hessian.lanczos_iters >= 2,
        'hessian.every_epochs must be >= 0 and hessian.lanczos_iters >= 2.')
