"""Config -> everything a run needs, each decision made once.

The builders turn a validated config into the run's parts: the long-tailed data
and its class statistics (:func:`build_data`, :func:`class_stats`), the
per-example loss with DRW timing (:func:`build_loss`), the optimizer chain
(:func:`build_direction` -> :func:`scope_plan`'s average -> clipping ->
:func:`build_base_optimizer`), and :func:`prepare` puts them together with the
model, the mesh and the sharded initial state in a :class:`Run`. Nothing here
compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

import sse_sam_jax as ssj
from sse_sam_jax import data as data_lib
from sse_sam_jax import losses as losses_lib
from sse_sam_jax import models
from sse_sam_jax.data import augment as augment_lib
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import schedules
from sse_sam_jax.train import sharding as sharding_lib
from sse_sam_jax.train.device_images import DeviceImages, on_device
from sse_sam_jax.train.step import MICROBATCH_AXIS, init_state


def precision(c):
  """The context a run of ``c`` builds and runs in: JAX's x64 mode for
  ``model.param_dtype='float64'`` (nothing otherwise). Wrap everything that builds,
  compiles or runs the run's arrays in it."""
  if c.model.param_dtype != 'float64':
    return contextlib.nullcontext()
  return jax.enable_x64(True)


def build_data(c) -> data_lib.LongTailData:
  """The config's dataset as long-tailed train / test (/ val) splits (float64 inputs
  with ``model.param_dtype='float64'``)."""
  lt = _build_data(c)
  if c.model.param_dtype == 'float64':
    for s in (lt.train, lt.test, lt.val):
      if s is not None and isinstance(s.x, np.ndarray) and s.x.dtype == np.float32:
        s.x = s.x.astype(np.float64)
  return lt


def _build_data(c) -> data_lib.LongTailData:
  d = c.data
  if d.name == 'mnist1d':
    return data_lib.mnist1d_long_tail(iid_noise_scale=d.iid_noise_scale,
                                      imbalance_factor=d.imbalance_factor,
                                      num_samples=d.num_samples, n_max=d.n_max,
                                      val_fraction=d.val_fraction,
                                      val_generated=d.val_generated,
                                      dtype=np.dtype(c.model.param_dtype))
  if d.name in ('cifar10', 'cifar100'):
    lt = data_lib.tfds_long_tail(d.name, d.imbalance_factor, data_dir=d.data_dir or None,
                                 profile=d.profile, selection=d.selection,
                                 val_fraction=d.val_fraction)
    for s in (lt.train, lt.test, lt.val):
      if s is not None and s.x.dtype == np.uint8:
        s.x = augment_lib.normalize_images(s.x)
    return lt
  if d.name == 'imagenet_lt':
    return data_lib.imagenet_lt(d.train_list, d.test_list, data_dir=d.data_dir or None,
                                size=d.image_size, val_fraction=d.val_fraction)
  if d.name == 'inaturalist2018':
    return data_lib.inaturalist2018(data_dir=d.data_dir or None, size=d.image_size,
                                    val_fraction=d.val_fraction)
  if d.name == 'npz':
    factor = d.imbalance_factor if d.imbalance_factor > 1 else None
    return data_lib.npz_long_tail(d.npz_path, factor, num_classes=d.num_classes or None,
                                  val_fraction=d.val_fraction, profile=d.profile,
                                  selection=d.selection)
  raise ValueError(f'unknown dataset {d.name!r}')


def class_stats(c, train: data_lib.Split) -> data_lib.ClassStats:
  """Training-set class counts with the dataset's Many/Medium/Few thresholds."""
  many, few = data_lib.SHOT_THRESHOLDS.get(c.data.shots, data_lib.SHOT_THRESHOLDS['default'])
  return data_lib.ClassStats.from_labels(train.label, train.num_classes, many_above=many,
                                         few_below=few)


def build_loss(c, stats: data_lib.ClassStats, steps_per_epoch: int):
  """Per-example loss ``(logits, labels, step, mask=None) -> [B]``; DRW switches on by
  step; ``loss.group_normalised`` rescales it to the head/tail group-normalised loss.
  ``mask`` (bool ``[B]``) leaves padded examples out of the batch sums that class
  weights and group normalisation divide by."""
  l = c.loss
  weights = None
  if l.drw_epoch >= 0:
    cb = jnp.asarray(losses_lib.class_balanced_weights(stats.counts, l.drw_beta))
    drw_step = int(l.drw_epoch) * steps_per_epoch
    weights = lambda step: jnp.where(step >= drw_step, cb, jnp.ones_like(cb))
  margins = losses_lib.ldam_margins(stats.counts, l.ldam_max_margin)

  def unweighted(logits, labels):
    if l.name == 'ce':
      return losses_lib.cross_entropy(logits, labels)
    if l.name == 'ldam':
      return losses_lib.ldam(logits, labels, margins, l.ldam_scale)
    if l.name == 'logit_adjusted':
      return losses_lib.logit_adjusted(logits, labels, stats.counts, l.tau)
    if l.name == 'vs':
      return losses_lib.vector_scaling(logits, labels, stats.counts, l.vs_gamma, l.tau)
    raise ValueError(l.name)

  def per_example(logits, labels, step, mask=None):
    losses = unweighted(logits, labels)  # (each loss weights classes as these lines do)
    if weights is not None:
      losses = losses_lib.apply_class_weights(losses, labels, weights(step), mask=mask)
    return losses

  if l.group_normalised:
    is_tail = jnp.asarray(stats.class_groups(c.optimizer.eta))  # 0 head, 1 tail
    return lambda logits, labels, step, mask=None: losses_lib.group_normalize(
        per_example(logits, labels, step, mask), is_tail[labels], mask=mask)
  return per_example


def sharpness_steps(c) -> ssj.SharpnessSteps | None:
  """The config's cheaper sharpness-aware steps, or ``None`` (every step exact)."""
  o = c.optimizer
  if o.sharpness_every == 1 and o.sharpness_fraction >= 1:
    return None
  return ssj.SharpnessSteps(every=int(o.sharpness_every), fraction=float(o.sharpness_fraction),
                            alpha=float(o.sharpness_alpha), seed=int(c.seed),
                            scale=o.sharpness_scale)


def shot_class_groups(stats) -> np.ndarray:
  """Every class's shot group: Many 0, Medium 1, Few 2 (``optimizer.name='shot_sam'``)."""
  shots = stats.shot_groups()
  return np.select([shots['many'], shots['medium'], shots['few']], [0, 1, 2]).astype(np.int32)


def class_groups_for(c, stats) -> np.ndarray | None:
  """The group of every class for the group methods (``None``: the method needs none)."""
  name = c.optimizer.name
  if name in ('sgd', 'sam', 'asam', 'focal_sam'):
    return None
  if name == 'shot_sam':
    return shot_class_groups(stats)
  return stats.class_groups(c.optimizer.eta)  # raises if no head or no tail class


def build_direction(c, steps_per_epoch: int, stats=None):
  """The sharpness-aware transform of ``c.optimizer.name`` (``None`` for SGD).
  ``stats`` (:class:`~sse_sam_jax.data.ClassStats`) is needed by ``focal_sam``."""
  o = c.optimizer
  kw = dict(adaptive_eta=o.adaptive_eta if o.adaptive or o.name == 'asam' else None,
            sharpness_steps=sharpness_steps(c))
  group_kw = dict(normalization=o.normalization, tail_weight=o.tail_weight, **kw)
  switch = ssj.switch_step(o.gamma, c.epochs, steps_per_epoch)

  def focal():
    if stats is None:
      raise ValueError("optimizer.name='focal_sam' needs the class statistics (stats=).")
    return ssj.focal_sam(o.rho, lam=o.focal_lambda, gamma=o.focal_gamma,
                         class_counts=stats.counts, **kw)

  return {
      'sgd': lambda: None,
      'sam': lambda: ssj.sam(o.rho, **kw),
      'asam': lambda: ssj.sam(o.rho, **kw),
      'imbsam': lambda: ssj.imbsam(o.tail_rho, **group_kw),
      'group_sam': lambda: ssj.group_sam((o.head_rho, o.tail_rho), normalization=o.normalization,
                                         group_weights=(1.0, o.tail_weight), **kw),
      'shot_sam': lambda: ssj.group_sam(tuple(o.shot_rhos), normalization=o.normalization,
                                        name='shot_sam', **kw),
      'focal_sam': focal,
      'sse_sam': lambda: ssj.sse_sam(o.head_rho, o.tail_rho, switch, **group_kw),
      'sam_then_imbsam': lambda: ssj.sam_then_imbsam(o.rho, o.tail_rho, switch, **group_kw),
  }[o.name]()


def build_base_optimizer(c, lr) -> list:
  """Weight decay and the base optimizer, fed the sharpness-aware direction.

  ``sgd`` / ``nesterov``: weight decay coupled into the direction at the unperturbed
  weights (the references' ``g + wd * w``), then SGD with (Nesterov) momentum.
  ``adamw``: Adam with decoupled weight decay (``optax.adamw``).
  """
  o = c.optimizer
  if o.base == 'adamw':
    return [optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)]
  return [optax.add_decayed_weights(o.weight_decay),
          optax.sgd(lr, momentum=o.momentum, nesterov=o.base == 'nesterov')]


@dataclasses.dataclass(frozen=True)
class ScopePlan:
  """What ``perturbation_scope`` decides, decided once (:func:`scope_plan`).

  ``average``: the transform chained right after the sharpness-aware one (the
  direction averaged across devices and/or microbatches), or ``None``;
  ``per_device_axis`` / ``microbatch``: how
  :class:`~sse_sam_jax.train.compiled_step.CompiledTrainStep` wraps the step;
  :meth:`layout` what every checkpoint records of it.
  """
  scope: str
  average: optax.GradientTransformation | None
  per_device_axis: str | None
  microbatch: int | None

  def layout(self, c, n_dev: int) -> dict:
    """What defines the perturbation's examples; saved with every checkpoint."""
    return {'devices': n_dev, 'perturbation_scope': self.scope,
            'perturbation_microbatch': int(self.microbatch or 0),
            'parameter_sharding': c.parameter_sharding}


def check_augment(c, lt: data_lib.LongTailData) -> None:
  """``data.augment`` needs images: ``[N, H, W, C]`` arrays (pad-crop-flip) or a lazy
  image reader (random resized crops); a one-line ``ValueError`` otherwise, before
  anything compiles."""
  x = lt.train.x
  if c.data.augment and not hasattr(x, 'gather') and len(x.shape) != 4:
    raise ValueError(f'data.augment: pad-crop-flip takes images [N, H, W, C]; the training '
                     f'inputs of {lt.dataset} are {list(x.shape[1:])} per example. Set '
                     'data.augment=False.')


def input_kwargs(model: str, x_shape: tuple, dataset: str) -> dict:
  """What the model needs to know of its input, or a one-line error naming the shape it
  takes: ``conv1d`` takes ``[N, L]`` or ``[N, L, channels]``, the ResNets images
  ``[N, H, W, C]``, ``mlp`` anything (flattened)."""
  example = list(x_shape[1:])
  if model == 'mlp':
    return {'in_features': int(np.prod(example))}
  if model == 'conv1d':
    if len(example) not in (1, 2):
      raise ValueError(f'{dataset}: model conv1d takes signals [N, L] or [N, L, channels]; the '
                       f'inputs are {example} per example (model.name=mlp takes any shape).')
    return {'in_channels': example[1] if len(example) == 2 else 1}
  if len(example) != 3:
    raise ValueError(f'{dataset}: model {model} takes images [N, H, W, C]; the inputs are '
                     f'{example} per example (model.name=mlp takes any shape).')
  return {}


def scope_plan(c) -> ScopePlan:
  """``global``: one perturbation of the whole batch, as one device computes it.
  ``per_device``: every device perturbs from its shard (``shard_map`` over the
  mesh axis), the directions averaged once. ``microbatch``: every run of
  ``perturbation_microbatch`` examples perturbs on its own (``vmap`` inside
  ``shard_map``: the same microbatches on any device count, and no gathered
  activations), averaged over both axes."""
  axis = sharding_lib.AXIS
  if c.perturbation_scope == 'per_device':
    return ScopePlan('per_device', ssj.mean_across(axis), axis, None)
  if c.perturbation_scope == 'microbatch':
    return ScopePlan('microbatch', ssj.mean_across((axis, MICROBATCH_AXIS)), axis,
                     int(c.perturbation_microbatch))
  return ScopePlan('global', None, None, None)


def build_optimizer(c, steps_per_epoch: int, stats=None):
  """Returns ``(tx, stage boundaries, the SAM-family transform or None)``: the SAM
  family first, then (per scope) the average across devices or microbatches,
  optional clipping of the direction
  (``optimizer.clip_norm``), weight decay and the base optimizer. The stage
  boundaries are read from the transform (:func:`sse_sam_jax.stage_boundaries`).

  With ``perturbation_scope='per_device'`` the direction is averaged across the
  mesh's ``data`` axis right after the sharpness-aware transform; with
  ``perturbation_scope='microbatch'`` across the microbatches and devices.
  """
  o = c.optimizer
  lr = schedules.make(o.schedule, o.lr, c.epochs, steps_per_epoch,
                      warmup_epochs=o.warmup_epochs)
  direction = build_direction(c, steps_per_epoch, stats)
  parts = [direction] if direction is not None else []
  scope = scope_plan(c)
  if scope.average is not None:
    parts.append(scope.average)
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts += build_base_optimizer(c, lr)
  boundaries = list(ssj.stage_boundaries(direction)) if direction is not None else []
  return optax.chain(*parts), boundaries, direction


@dataclasses.dataclass
class Run:
  """Everything a run is built from, before anything compiles."""
  data: data_lib.LongTailData
  stats: data_lib.ClassStats
  class_groups: np.ndarray | None
  spec: data_lib.BatchSpec
  steps_per_epoch: int
  mesh: jax.sharding.Mesh
  state_sharding: object  # a NamedSharding per state leaf
  batch_sharding: NamedSharding
  model: models.FunctionalModel
  state: object
  loss: object
  tx: optax.GradientTransformation
  boundaries: list
  scope: ScopePlan
  direction: optax.GradientTransformation | None = None  # the SAM-family transform
  pads_last_batch: bool = False  # the partial batch runs padded in the full batch's program
  running_stats: object = 'clean'  # train_step's running_stats, or stage -> it
  input_dtype: type = np.float32  # of the batches' x (float64 with model.param_dtype)
  device_images: DeviceImages | None = None  # data.augment_on: the device augments

  def sharpness_step_at(self, step: int) -> bool | None:
    """Whether ``step`` runs the perturbed passes (``None``: every step does)."""
    return None if self.direction is None else ssj.sharpness_step_at(self.direction, step)


def prepare(c) -> Run:
  """Data, class statistics, checks against them, model, loss, optimizer, initial state."""
  config_lib.validate(c)
  lt = build_data(c)
  check_augment(c, lt)
  stats = class_stats(c, lt.train)
  class_groups = class_groups_for(c, stats)
  spec = data_lib.BatchSpec(c.data.batch_size, c.data.drop_remainder)
  steps_per_epoch = spec.steps_per_epoch(len(lt.train))

  mesh = sharding_lib.make_mesh(c.num_devices)
  check_batch_sizes(c, spec.batch_sizes(len(lt.train)), mesh.devices.size)

  model_kw = dict(normed_classifier=c.model.normed_classifier,
                  **input_kwargs(c.model.name, tuple(lt.train.x.shape), lt.dataset))
  if c.model.name in ('conv1d', 'mlp'):
    model_kw['init'] = c.model.init
  compute_dtype = None if c.model.compute_dtype == 'float32' else jnp.dtype(c.model.compute_dtype)
  model, params, batch_stats = models.create(c.model.name, lt.train.num_classes, seed=c.seed,
                                             compute_dtype=compute_dtype, **model_kw)
  if c.model.running_stats == 'every_pass':
    model = dataclasses.replace(model, running_variance='unbiased')
  if c.model.param_dtype == 'float64':
    params, batch_stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                       (params, batch_stats))
  if c.model.init_from:
    params, batch_stats = models.load_weights(c.model.init_from, params, batch_stats)
  loss = build_loss(c, stats, steps_per_epoch)
  tx, boundaries, direction = build_optimizer(c, steps_per_epoch, stats)
  state = init_state(params, batch_stats, tx)
  state_sharding = sharding_lib.state_sharding(state, mesh, c.parameter_sharding,
                                               min_elements=c.fsdp_min_elements)
  state = jax.device_put(state, state_sharding)
  pads = (len(spec.batch_sizes(len(lt.train))) > 1 and pads_last_batch(c)
          and model.masks_padding)
  input_dtype = np.dtype(c.model.param_dtype).type
  images = (DeviceImages(lt.train.x, mesh, input_dtype)
            if on_device(c.data.augment_on, c.data.augment, lt.train.x) else None)
  return Run(lt, stats, class_groups, spec, steps_per_epoch, mesh, state_sharding,
             sharding_lib.batch_sharding(mesh), model, state, loss, tx, boundaries,
             scope_plan(c), direction, pads, running_stats_plan(c), input_dtype, images)


def running_stats_plan(c):
  """``train_step``'s ``running_stats`` for the config: ``model.running_stats`` as it is,
  or for ``'every_pass'`` a function of the stage giving the order of the forward passes
  of the authors' PyTorch step, every one of which updates the running statistics:
  SGD one pass at ``w``; SAM, ASAM, Focal-SAM and ImbSAM a pass at ``w`` and one at the
  perturbed weights; SSE-SAM per group (head, then tail) a pass at ``w`` and one at
  ``w + eps_group``. A radius of 0 (SSE-SAM's head in stage 2) still runs its pass in
  the reference, at ``w + 0``: the clean pass's statistics again. Other optimizers: the
  clean pass, then each perturbed pass."""
  if c.model.running_stats != 'every_pass':
    return c.model.running_stats
  o = c.optimizer
  at = lambda rho: 'perturbed' if rho > 0 else 'clean'
  if o.name == 'sgd':
    return lambda stage: ('clean',)
  if o.name in ('sam', 'asam', 'focal_sam'):
    return lambda stage: ('clean', at(o.rho))
  if o.name == 'imbsam':
    return lambda stage: ('clean', at(o.tail_rho))
  if o.name == 'sse_sam':
    # stage 0 (or None: one stage) perturbs the head; stage 1 does not
    return lambda stage: ('clean', at(o.head_rho if not stage else 0.0), 'clean', at(o.tail_rho))
  return 'every_pass'


def pads_last_batch(c) -> bool:
  """Whether the config lets the epoch's last, partial, batch run padded in the full
  batch's program (the model must also mask padding: ``FunctionalModel.masks_padding``).
  Not with microbatch perturbations (their ghost BatchNorm and direction average would
  see all-padding microbatches) nor with ``optimizer.normalization='group'`` (its group
  sums divide by the group's size, which the padded step's weights do not undo)."""
  return (c.data.pad_last_batch and c.perturbation_scope != 'microbatch'
          and c.optimizer.normalization != 'group')


def check_batch_sizes(c, batch_sizes, n_dev: int) -> None:
  """Every batch must split over the devices, and with microbatches every device's
  shard into whole microbatches; raises before anything compiles."""
  bad = [b for b in batch_sizes if b % n_dev]
  if bad:
    raise ValueError(f'batch sizes {bad} do not divide over {n_dev} devices; set '
                     'data.drop_remainder=True or a batch size divisible by the device count.')
  m = c.perturbation_microbatch
  bad = [b // n_dev for b in batch_sizes if (b // n_dev) % m] if m else []
  if bad:
    raise ValueError(f'per-device batches of {bad} examples do not split into microbatches of '
                     f'perturbation_microbatch={m}; choose m dividing them (or '
                     'data.drop_remainder=True).')
