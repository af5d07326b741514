"""The trainer: data -> grain pipeline -> one jitted sharded step -> metrics, checkpoints.

``train(config, workdir)`` is the whole loop. Read top to bottom: build the
data and its class statistics, validate everything against them, build the
model, loss and optimizer, compile every program the run needs, then loop
over epochs. Nothing inside the loop waits on the device except the metric
reads every ``log_every_steps`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

import sse_sam_jax.optim as ssj
from sse_sam_jax import data as data_lib
from sse_sam_jax import losses as losses_lib
from sse_sam_jax import models
from sse_sam_jax.data import augment as augment_lib
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import evaluate as eval_lib
from sse_sam_jax.train import schedules
from sse_sam_jax.train.checkpointing import Checkpoints
from sse_sam_jax.train import sharding as sharding_lib
from sse_sam_jax.train import workdir as workdir_lib
from sse_sam_jax.train.workdir import UserError
from sse_sam_jax.train.step import MICROBATCH_AXIS, CompiledTrainStep, init_state


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------
def build_data(c) -> data_lib.LongTailData:
  d = c.data
  if d.name == 'mnist1d':
    return data_lib.mnist1d_long_tail(iid_noise_scale=d.iid_noise_scale,
                                      imbalance_factor=d.imbalance_factor,
                                      num_samples=d.num_samples, n_max=d.n_max,
                                      val_fraction=d.val_fraction)
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
    return data_lib.npz_long_tail(d.npz_path, d.imbalance_factor if d.imbalance_factor > 1 else None,
                                  val_fraction=d.val_fraction, profile=d.profile,
                                  selection=d.selection)
  raise ValueError(f'unknown dataset {d.name!r}')


def class_stats(c, train: data_lib.Split) -> data_lib.ClassStats:
  many, few = data_lib.SHOT_THRESHOLDS.get(c.data.shots, data_lib.SHOT_THRESHOLDS['default'])
  return data_lib.ClassStats.from_labels(train.label, train.num_classes, many_above=many,
                                         few_below=few)


def build_loss(c, stats: data_lib.ClassStats, steps_per_epoch: int):
  """Per-example loss ``(logits, labels, step) -> [B]``; DRW switches on by step."""
  l = c.loss
  weights = None
  if l.drw_epoch >= 0:
    cb = jnp.asarray(losses_lib.class_balanced_weights(stats.counts, l.drw_beta))
    drw_step = int(l.drw_epoch) * steps_per_epoch
    weights = lambda step: jnp.where(step >= drw_step, cb, jnp.ones_like(cb))
  margins = losses_lib.ldam_margins(stats.counts, l.ldam_max_margin)

  def loss(logits, labels, step):
    w = None if weights is None else weights(step)
    if l.name == 'ce':
      return losses_lib.cross_entropy(logits, labels, w)
    if l.name == 'ldam':
      return losses_lib.ldam(logits, labels, margins, l.ldam_scale, w)
    if l.name == 'logit_adjusted':
      return losses_lib.logit_adjusted(logits, labels, stats.counts, l.tau, w)
    if l.name == 'vs':
      return losses_lib.vector_scaling(logits, labels, stats.counts, l.vs_gamma, l.tau, w)
    raise ValueError(l.name)
  return loss


def build_direction(c, steps_per_epoch: int):
  """The sharpness-aware transform of ``c.optimizer.name`` (``None`` for SGD)."""
  o = c.optimizer
  group_kw = dict(normalization=o.normalization, tail_weight=o.tail_weight)
  switch = ssj.switch_step(o.gamma, c.epochs, steps_per_epoch)
  return {
      'sgd': lambda: None,
      'sam': lambda: ssj.sam(o.rho),
      'imbsam': lambda: ssj.imbsam(o.tail_rho, **group_kw),
      'group_sam': lambda: ssj.group_sam((o.head_rho, o.tail_rho), normalization=o.normalization,
                                         group_weights=(1.0, o.tail_weight)),
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


def build_optimizer(c, steps_per_epoch: int):
  """Returns ``(tx, stage boundaries)``: the SAM family first, then (per scope) the
  average across devices or microbatches, optional clipping of the direction
  (``optimizer.clip_norm``), weight decay and the base optimizer. The stage
  boundaries are read from the transform (:func:`sse_sam_jax.stage_boundaries`).

  With ``perturbation_scope='per_device'`` the direction is averaged across the
  mesh's ``data`` axis right after the sharpness-aware transform; with
  ``perturbation_scope='microbatch'`` across the microbatches and devices.
  """
  o = c.optimizer
  lr = schedules.make(o.schedule, o.lr, c.epochs, steps_per_epoch,
                      warmup_epochs=o.warmup_epochs)
  direction = build_direction(c, steps_per_epoch)
  parts = [direction] if direction is not None else []
  if c.perturbation_scope == 'per_device':
    parts.append(ssj.mean_across('data'))
  elif c.perturbation_scope == 'microbatch':
    parts.append(ssj.mean_across(('data', MICROBATCH_AXIS)))
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts += build_base_optimizer(c, lr)
  boundaries = list(ssj.stage_boundaries(direction)) if direction is not None else []
  return optax.chain(*parts), boundaries


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------
class MetricLog:
  """JSON lines + TensorBoard, written by the first host only (every host computes the
  same metrics)."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / 'metrics.jsonl'
    self.primary = jax.process_index() == 0
    if self.primary:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, **scalars):
    if not self.primary:
      return
    with self.path.open('a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    for k, v in scalars.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def discard_after(self, step: int):
    """Drops the lines of steps after ``step`` (a resumed run redoes them)."""
    if not self.primary or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [l for l in lines if json.loads(l)['step'] <= step]
    if len(kept) < len(lines):
      tmp = self.path.with_suffix('.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self.path)

  def close(self):
    if self.primary:
      self.tb.close()


def plot_per_class(per_class, counts, path, title=''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.scatter(counts, 100 * np.asarray(per_class, float))
  ax.set_xscale('log')
  ax.set_xlabel('training examples of the class')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
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


def prepare(c) -> Run:
  """Data, class statistics, checks against them, model, loss, optimizer, initial state."""
  config_lib.validate(c)
  lt = build_data(c)
  stats = class_stats(c, lt.train)
  class_groups = None
  if c.optimizer.name not in ('sgd', 'sam'):
    class_groups = stats.class_groups(c.optimizer.eta)  # raises if no head or no tail class
  spec = data_lib.BatchSpec(c.data.batch_size, c.data.drop_remainder)
  steps_per_epoch = spec.steps_per_epoch(len(lt.train))

  mesh = sharding_lib.make_mesh(c.num_devices)
  check_batch_sizes(c, spec.batch_sizes(len(lt.train)), mesh.devices.size)

  model_kw = dict(normed_classifier=c.model.normed_classifier)
  if c.model.name == 'mlp':
    model_kw['in_features'] = int(np.prod(lt.train.x.shape[1:]))
  model, params, batch_stats = models.create(c.model.name, lt.train.num_classes, seed=c.seed,
                                             **model_kw)
  loss = build_loss(c, stats, steps_per_epoch)
  tx, boundaries = build_optimizer(c, steps_per_epoch)
  state = init_state(params, batch_stats, tx)
  state_sharding = sharding_lib.state_sharding(state, mesh, c.parameter_sharding,
                                               min_elements=c.fsdp_min_elements)
  state = jax.device_put(state, state_sharding)
  return Run(lt, stats, class_groups, spec, steps_per_epoch, mesh, state_sharding,
             sharding_lib.batch_sharding(mesh), model, state, loss, tx, boundaries)


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


def model_signature(state) -> str:
  """A digest of the names, shapes and dtypes of the parameters and BatchNorm statistics."""
  import hashlib
  leaves = jax.tree_util.tree_flatten_with_path((state.params, state.batch_stats))[0]
  text = ';'.join(f'{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}' for path, x in leaves)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def perturbation_layout(c, n_dev: int) -> dict:
  """What defines the perturbation's examples; saved with every checkpoint."""
  return {'devices': n_dev, 'perturbation_scope': c.perturbation_scope,
          'perturbation_microbatch': int(c.perturbation_microbatch),
          'parameter_sharding': c.parameter_sharding}


def check_resume_layout(saved: dict, c, n_dev: int) -> None:
  """Refuses a resume that would silently change which examples a perturbation sees.

  Global perturbations and fixed microbatches do not depend on the device
  count, so such runs resume on any mesh (Orbax reshards the state). Per-device
  perturbations perturb from ``batch / devices`` examples: resuming on another
  device count would change that ``m``.
  """
  if 'devices' not in saved:  # checkpoints from before the layout was recorded
    return
  now, batch_size = perturbation_layout(c, n_dev), c.data.batch_size
  for key in ('perturbation_scope', 'perturbation_microbatch'):
    if saved[key] != now[key]:
      raise ValueError(f'the checkpoint was trained with {key}={saved[key]!r}, this config '
                       f'has {now[key]!r}; resuming would change the method. Use the same '
                       'value or a new workdir.')
  if c.perturbation_scope == 'per_device' and saved['devices'] != n_dev:
    raise ValueError(
        f"the checkpoint was trained with per-device perturbations on {saved['devices']} "
        f"devices (m = {batch_size // saved['devices']} examples per perturbation); this mesh "
        f'has {n_dev} devices (m = {batch_size // n_dev}). Resume on {saved["devices"]} '
        "devices (num_devices=...), or train with perturbation_scope='microbatch', which "
        'fixes m whatever the device count.')


def restore_newest_intact(checkpoints, abstract_state, c, n_dev: int):
  """``(state, data_state, meta)`` of the newest checkpoint that reads back whole, or
  ``None`` when there is none.

  A checkpoint of another model (by its saved signature) or another perturbation
  layout is a :class:`UserError`: a real mismatch. A checkpoint that cannot be
  read (truncated or missing files, random bytes, a missing item) is damaged: it
  is reported in one line on stderr, moved to ``checkpoints/damaged/`` and the
  next older one is tried.
  """
  signature = model_signature(abstract_state)
  for step in checkpoints.steps():
    try:
      meta = checkpoints.meta(step=step)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      _damaged(checkpoints, step, e)
      continue
    saved = meta.get('model_signature')
    if saved is not None and saved != signature:
      raise UserError(f'the checkpoint at step {step} holds another model (signature {saved}, '
                      f"this config's {signature}); use a new --workdir.")
    check_resume_layout(meta, c, n_dev)
    try:
      state, data_state, meta = checkpoints.restore(abstract_state, step=step)
      if int(data_state['next_index']) != int(state.step) or int(state.step) != step:
        raise ValueError(f"its step {int(state.step)}, data position "
                         f"{data_state['next_index']} and folder {step} disagree")
      if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params)):
        raise ValueError('non-finite parameters')
    except Exception as e:  # pylint: disable=broad-except
      _damaged(checkpoints, step, e)
      continue
    return state, data_state, meta
  return None


def _damaged(checkpoints, step: int, error: Exception) -> None:
  target = checkpoints.set_aside(step)
  reason = ' '.join(f'{type(error).__name__}: {error}'.split())[:160]
  print(f'checkpoint step {step} is damaged ({reason}); moved to {target}, trying an older '
        'one.', file=sys.stderr, flush=True)


def has_checkpoint(workdir) -> bool:
  """Whether ``workdir`` holds a checkpoint; reads the folder only (creates nothing)."""
  last = pathlib.Path(workdir) / 'checkpoints' / 'last'
  return last.is_dir() and any(p.name.isdigit() for p in last.iterdir())


def restore_model(c, workdir, which: str = 'last'):
  """``(run, {'step', 'params', 'batch_stats'}, meta)`` of the ``which`` checkpoint
  ('last', or 'best' falling back to 'last'), for evaluation and analysis. Only the
  model is read, so a checkpoint of any optimizer, perturbation scope or mesh fits a
  config with the same model; another model (by the signature saved with the
  checkpoint) is a ``ValueError``."""
  if not has_checkpoint(workdir):  # before anything is built or written
    raise UserError(f'no checkpoint in {pathlib.Path(workdir) / "checkpoints" / "last"}; '
                    f'train first: sse-sam-jax train --workdir {workdir}')
  run = prepare(c)
  checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep)
  if which == 'best' and checkpoints.best.latest_step() is None:
    which = 'last'
  meta = checkpoints.meta(which)
  saved, ours = meta.get('model_signature'), model_signature(run.state)
  if saved is not None and saved != ours:
    checkpoints.close()
    raise ValueError(f'the checkpoint does not fit model {c.model.name!r} on {c.data.name!r} '
                     f'(model signature {saved}, this config\'s {ours}); was it written by '
                     'another config?')
  state = checkpoints.restore_model(run.state, which)
  checkpoints.close()
  return run, state, dict(meta, checkpoint=which)


def hessian_subset(split: data_lib.Split, max_examples: int, seed: int) -> data_lib.Split:
  if len(split) <= max_examples:
    return split
  return split.subset(np.sort(np.random.default_rng(seed).permutation(len(split))[:max_examples]))


def head_tail_extremes(run: Run, state, split: data_lib.Split, eta: float, iters: int,
                       seed: int = 0) -> dict:
  """Head and tail lambda_min / lambda_max (batch-normalised group losses, eval-mode BN)."""
  from sse_sam_jax import analysis
  step = int(state.step)
  loss = analysis.model_loss(run.model, state.batch_stats,
                             lambda logits, y: run.loss(logits, y, step))
  groups = analysis.groups_for(run.stats, 'head_tail', eta)
  spectra = analysis.group_spectra(loss, state.params, split, groups, lanczos_iters=iters,
                                   trace_probes=0, density=False, seed=seed)
  return {f'hessian_{g}_{k}': spectra[g][k] for g in spectra for k in ('lambda_min', 'lambda_max')}


def hessian_of_checkpoint(c, workdir, *, groups: str = 'head_tail', split: str = 'train',
                          lanczos_iters: int = 40, trace_probes: int = 20, slq_probes: int = 2,
                          max_examples: int = 4096, seed: int = 0,
                          progress: bool = False) -> dict:
  """Per-group spectra of the last checkpoint of ``workdir``; writes JSON and a density plot."""
  from sse_sam_jax import analysis
  from sse_sam_jax.analysis import spectra as spectra_lib
  run, state, _ = restore_model(c, workdir, 'last')
  data = {'train': run.data.train, 'test': run.data.test, 'val': run.data.val}[split]
  if data is None:
    raise ValueError(f'no {split} split in this config.')
  data = hessian_subset(data, max_examples, seed)
  step = int(state['step'])
  loss = analysis.model_loss(run.model, state['batch_stats'],
                             lambda logits, y: run.loss(logits, y, step))
  result = analysis.group_spectra(
      loss, state['params'], data, analysis.groups_for(run.stats, groups, c.optimizer.eta),
      lanczos_iters=lanczos_iters, slq_probes=slq_probes, trace_probes=trace_probes, seed=seed,
      progress=progress)
  path = spectra_lib.write(result, workdir)
  lines = ['| group | examples | lambda_min | lambda_max | trace |', '| --- | --- | --- | --- | --- |']
  for g, r in result.items():
    lines.append(f"| {g} | {r['examples']} | {r['lambda_min']:.4g} | {r['lambda_max']:.4g} | "
                 f"{r['trace']:.4g} +- {r['trace_se']:.2g} |")
  return {'spectra': result, 'table': '\n'.join(lines), 'path': str(path)}


def evaluate_checkpoint(c, workdir, which: str = 'best') -> dict:
  """Evaluates the best (else the last) checkpoint of ``workdir`` on val and test
  (any optimizer's or scope's checkpoint of this config's model, see :func:`restore_model`)."""
  run, state, meta = restore_model(c, workdir, which)
  predict = eval_lib.make_predict(run.model, c.eval.flip_tta)
  result = {'checkpoint': meta['checkpoint'], 'step': int(state['step']), 'meta': meta}
  for name, split in (('val', run.data.val), ('test', run.data.test)):
    if split is not None:
      result[name] = eval_lib.evaluate(predict, state['params'], state['batch_stats'], split,
                                       run.stats, c.eval.batch_size,
                                       batch_sharding=run.batch_sharding)
  result['table'] = eval_lib.format_table(
      {f"{c.optimizer.name} ({meta['checkpoint']})": result['test']})
  return result


def train(c, workdir, *, progress: bool = True, stop_after_steps: int | None = None,
          restart: bool = False) -> dict:
  """Trains from ``c`` in ``workdir`` (resuming from its last checkpoint) and evaluates.

  The workdir is claimed first (:func:`sse_sam_jax.train.workdir.claim`): a lock
  against a second process, and the saved config against this one. A finished
  run's results are returned as saved, without building or compiling anything.
  ``restart`` moves an existing run aside and starts fresh. ``stop_after_steps``
  stops early (as if killed) after that many steps; for tests. Returns the
  final metrics (test, and val if held out).
  """
  config_lib.validate(c)
  workdir = pathlib.Path(workdir)
  lock = workdir_lib.claim(workdir, c.to_dict(), restart=restart)
  try:
    finished = finished_result(workdir)
    if finished is not None:
      print(f'{workdir} finished at step {finished["total_steps"]}; its results:')
      return finished
    return _train(c, workdir, progress, stop_after_steps)
  finally:
    lock.release()


def finished_result(workdir: pathlib.Path) -> dict | None:
  """The saved results of a finished run in ``workdir`` (its config was checked), or ``None``."""
  path = workdir / 'results.json'
  if not path.exists() or not has_checkpoint(workdir):
    return None
  result = json.loads(path.read_text())
  last = pathlib.Path(workdir) / 'checkpoints' / 'last'
  newest = max(int(p.name) for p in last.iterdir() if p.name.isdigit())
  if result.get('total_steps') != newest:
    return None
  return dict(result, already_finished=True)


def _train(c, workdir: pathlib.Path, progress: bool, stop_after_steps: int | None) -> dict:
  run = prepare(c)
  lt, stats, spec = run.data, run.stats, run.spec
  steps_per_epoch, total_steps = run.steps_per_epoch, c.epochs * run.steps_per_epoch
  state, model = run.state, run.model
  batch_sharding = run.batch_sharding
  n_dev = run.mesh.devices.size
  train_step = CompiledTrainStep(
      model, run.tx, run.loss, run.class_groups, boundaries=run.boundaries,
      state_sharding=run.state_sharding, batch_sharding=batch_sharding,
      # microbatches run per device too (shard_map): the same microbatches as on one
      # device, and GSPMD would gather the activations of the vmapped convolutions
      per_device_axis=None if c.perturbation_scope == 'global' else 'data',
      microbatch=c.perturbation_microbatch or None)
  layout = dict(perturbation_layout(c, n_dev), model_signature=model_signature(state))

  checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep)
  start_step = 0
  restored = restore_newest_intact(checkpoints, state, c, n_dev)
  if restored is not None:
    state, data_state, _ = restored
    start_step = int(data_state['next_index'])
    print(f'Resumed from step {start_step} (epoch {start_step // steps_per_epoch}).')

  augment = augment_lib.pad_crop_flip if c.data.augment else None  # lazy images: RRC + flip
  batches = data_lib.train_batches(lt.train, spec, num_epochs=c.epochs, seed=c.seed,
                                   augment=augment, num_workers=c.data.num_workers,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  batch_iter = iter(batches)
  if start_step:
    batch_iter.set_state({'next_index': start_step})

  example_shape = tuple(lt.train.x.shape[1:])
  shapes = [{'x': jax.ShapeDtypeStruct((b,) + example_shape, np.float32, sharding=batch_sharding),
             'label': jax.ShapeDtypeStruct((b,), np.int32, sharding=batch_sharding)}
            for b in spec.batch_sizes(len(lt.train))]
  compile_s = train_step.precompile(state, shapes)
  predict = eval_lib.make_predict(model, c.eval.flip_tta)
  log = MetricLog(workdir)
  log.discard_after(start_step)
  print(f'{c.data.name}: {len(lt.train)} train examples, class counts '
        f'{stats.counts.min()}..{stats.counts.max()}, {steps_per_epoch} steps/epoch; '
        f'{c.optimizer.name}, {n_dev} device(s); {train_step.compiles} program(s) compiled '
        f'in {compile_s:.1f}s.')

  def evaluate(split):
    return eval_lib.evaluate(predict, state.params, state.batch_stats, split, stats,
                             c.eval.batch_size, batch_sharding=batch_sharding)

  from tqdm.auto import tqdm
  step = start_step
  pending = []
  t_start = time.perf_counter()
  while step < total_steps:
    epoch = step // steps_per_epoch
    epoch_end = (epoch + 1) * steps_per_epoch
    bar = tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch,
               desc=f'epoch {epoch + 1}/{c.epochs}', disable=not progress, leave=False)
    while step < epoch_end:
      batch = next(batch_iter)
      assert int(batch['step']) == step
      host_batch = {'x': batch['x'].astype(np.float32), 'label': batch['label'].astype(np.int32)}
      if jax.process_count() > 1:  # every host holds its rows of the global batch
        device_batch = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(batch_sharding, a), host_batch)
      else:
        device_batch = jax.device_put(host_batch, batch_sharding)
      state, metrics = train_step(state, device_batch, step)
      pending.append(metrics)
      step += 1
      bar.update(1)
      if len(pending) >= c.log_every_steps or step == epoch_end:
        summed = jax.device_get(pending)  # the only host sync of the loop
        pending = []
        if not all(bool(m['finite']) for m in summed):
          checkpoints.wait()
          checkpoints.close()
          log.close()
          kept = checkpoints.latest_step()
          kept = (f'the last good checkpoint (step {kept}) is kept in {workdir}' if kept
                  is not None else 'no checkpoint was written yet')
          raise NonFiniteLossError(
              f'non-finite loss or parameters before step {step}; stopped; {kept}. The '
              'inputs were checked finite when loaded: lower the learning rate or the radius.')
        n = sum(int(m['count']) for m in summed)
        train_loss = sum(float(m['loss_sum']) for m in summed) / n
        train_acc = sum(int(m['correct']) for m in summed) / n
        bar.set_postfix(loss=f'{train_loss:.4f}', acc=f'{100 * train_acc:.1f}')
        log.write(step, train_loss=train_loss, train_accuracy=train_acc, epoch=epoch + 1)
      if stop_after_steps is not None and step >= stop_after_steps:
        break
    bar.close()
    if stop_after_steps is not None and step >= stop_after_steps:
      checkpoints.wait()
      checkpoints.close()
      log.close()
      return {'stopped_at': step}

    done_epochs = step // steps_per_epoch
    last = step >= total_steps
    score, scalars = None, {}
    if last or done_epochs % c.eval.every_epochs == 0:
      for split_name, split in (('val', lt.val), ('test', lt.test)):
        if split is not None:
          m = evaluate(split)
          scalars.update({f'{split_name}_{k}': m[k]
                          for k in ('all', 'balanced', 'many', 'medium', 'few')})
      if c.eval.select_on != 'none':  # balanced accuracy: the val split is long-tailed
        score = scalars.get(f'{c.eval.select_on}_balanced')
      log.write(step, **scalars)
    if c.hessian.every_epochs and (last or done_epochs % c.hessian.every_epochs == 0):
      log.write(step, epoch=done_epochs, **head_tail_extremes(
          run, state, hessian_subset(lt.train, c.hessian.max_examples, c.hessian.seed),
          c.optimizer.eta, c.hessian.lanczos_iters, c.hessian.seed))
    if last or done_epochs % c.checkpoint.every_epochs == 0:
      checkpoints.save(step, state, batch_iter.get_state(),
                       {'epoch': done_epochs, **layout,
                        **{k: float(v) for k, v in scalars.items()}}, score)

  checkpoints.wait()
  checkpoints.close()
  log.close()
  train_seconds = time.perf_counter() - t_start
  result = {'config': c.to_dict(), 'train_seconds': train_seconds, 'total_steps': total_steps,
            'class_counts': stats.counts.tolist(), 'compiles': train_step.compiles}
  for split_name, split in (('val', lt.val), ('test', lt.test)):
    if split is not None:
      result[split_name] = evaluate(split)
  result['table'] = eval_lib.format_table({c.optimizer.name: result['test']})
  if jax.process_index() == 0:
    (workdir / 'results.json').write_text(json.dumps(result, indent=1))
    plot_per_class(result['test']['per_class'], stats.counts, workdir / 'per_class_accuracy.png',
                   f'{c.data.name}, {c.optimizer.name}')
  result['state'] = state  # not in results.json
  return result
