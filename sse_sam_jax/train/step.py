"""The train state and the one jitted training step.

A step is one clean forward pass at ``w`` (training-mode BatchNorm, whose
running statistics are the ones kept), the backward passes the optimizer asks
for, the perturbed passes (inside the optimizer), and the base optimizer. The
clean pass is shared with the optimizer through ``loss_vjp``, so no
sharpness-aware method repeats it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sse_sam_jax.optim import stage_at as optim_stage_at
from sse_sam_jax.train import executable_cache as executable_cache_lib

# (logits, labels, step) -> per-example losses [B]
PerExampleLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


RUNNING_STATS = ('clean', 'last_perturbed')
CPU_CONVOLUTIONS = ('eigen', 'ynnpack')


def compiler_options(cpu_convolutions: str) -> dict:
  """XLA options for the train step: ``'eigen'`` on XLA:CPU keeps XLA's default
  YNNPACK fusions (dots, reductions) except the convolutions, which Eigen runs.

  In a ResNet-32 b128 SGD step on 2 cores (``benchmarks/cpu_convolutions.py``) the
  YNNPACK weight-gradient convolutions of the first stage took 35-60 ms each; with
  Eigen the step ran ~1.5x faster. It changes which kernels compute the
  convolutions, so CPU results differ from ``'ynnpack'``'s in the last bits.
  """
  if cpu_convolutions not in CPU_CONVOLUTIONS:
    raise ValueError(f'cpu_convolutions must be one of {CPU_CONVOLUTIONS}, got '
                     f'{cpu_convolutions!r}.')
  if cpu_convolutions == 'ynnpack' or jax.default_backend() != 'cpu':
    return {}
  kinds = ('INDIVIDUAL_DOT', 'REDUCE')  # XLA's default set less INDIVIDUAL_CONVOLUTION
  return {'xla_cpu_experimental_ynn_fusion_type':
          ','.join('LIBRARY_FUSION_TYPE_' + k for k in kinds)}


def train_step(state: TrainState, batch: dict, *, model, tx, loss: PerExampleLoss,
               class_groups=None, stage: int | None = None, sharpness_step: bool | None = None,
               running_stats: str = 'clean'):
  """One optimization step. ``batch`` has ``'x'`` and ``'label'``.

  ``class_groups`` (int ``[C]``, head 0 / tail 1) gives every example its group
  for the group methods. ``stage`` (a Python int) fixes the stage of a
  :func:`sse_sam_jax.stage_switch` in the chain (see there). Returns
  ``(new_state, metrics)``; ``metrics`` holds sums over the batch (``loss_sum``,
  ``correct``, ``count``) so that they add up across steps and devices, and
  ``finite`` (False if the loss or the new parameters are NaN/Inf).

  A padded batch (the epoch's last, partial, batch run in the full batch's program)
  has ``'mask'`` (bool ``[B]``, False on padding): the loss is called as ``loss(logits,
  labels, step, mask)`` and every real example's loss weighted ``B / count``, padding's
  0, so that the means over ``B`` that the optimizers take (SAM's ``1/B``, the group
  sums with ``normalization='batch'``) are the means over the real examples; padding
  is in no group, BatchNorm leaves it out of its statistics (the model must mask it:
  ``model.masks_padding``), and the metrics count the real examples only. (Group sums
  with ``normalization='group'`` divide by a group's size instead: pad only without them.)

  ``sharpness_step`` (a Python bool) fixes the kind of step of a transform built
  with ``sharpness_steps`` (see :mod:`sse_sam_jax.optim.sharpness_reuse`).
  ``running_stats``: BatchNorm running statistics updated from the clean pass
  (``'clean'``, the default) or from the last perturbed pass of the step
  (``'last_perturbed'``; the clean pass's when the step has none), as the
  authors' PyTorch loop, whose every forward pass updates them, ends up with
  the last pass's batch statistics folded in last.
  """
  if running_stats not in RUNNING_STATS:
    raise ValueError(f'running_stats must be one of {RUNNING_STATS}, got {running_stats!r}.')
  x, labels, mask = batch['x'], batch['label'], batch.get('mask')
  if mask is None:
    apply = functools.partial(model.apply, train=True)
    example_losses = lambda logits: loss(logits, labels, state.step)
  else:
    if not getattr(model, 'masks_padding', False):
      raise ValueError("the batch has a 'mask' (padding) but the model's BatchNorm would "
                       'count the padded examples; build its BatchNorm layers as '
                       'sse_sam_jax.models.MaskedBatchNorm.')
    apply = functools.partial(model.apply, train=True, example_mask=mask)
    count = jnp.sum(mask.astype(jnp.int32))
    b = mask.shape[0]

    def example_losses(logits):
      # B / count on the real examples, 0 on padding: every mean over the B examples
      # (the optimizers' 1/B and group sums) is then the mean over the real ones.
      losses = loss(logits, labels, state.step, mask)
      weight = jnp.where(mask, b / jnp.maximum(count, 1).astype(losses.dtype), 0)
      return losses * weight.astype(losses.dtype)

  def clean_pass(params):
    logits, new_stats = apply(params, state.batch_stats, x)
    return example_losses(logits), (logits, new_stats)

  keep_perturbed = running_stats == 'last_perturbed'

  def loss_fn(params):  # perturbed passes: full-batch BN statistics
    logits, stats = apply(params, state.batch_stats, x)
    losses = example_losses(logits)
    return (losses, stats) if keep_perturbed else losses  # running stats dropped by default

  losses, vjp_fn, (logits, new_stats) = jax.vjp(clean_pass, state.params, has_aux=True)
  # The plain gradient; sharpness-aware transforms given `loss_vjp` do not read it, and
  # the compiler drops it then (see benchmarks/step_cost.py).
  grads = vjp_fn(jnp.full_like(losses, 1.0 / losses.shape[0]))[0]
  extra = dict(loss_fn=loss_fn, loss_vjp=(losses, vjp_fn), labels=labels)
  if class_groups is not None:
    extra['group_ids'] = jnp.asarray(class_groups)[labels]
    if mask is not None:  # padding in no group (its losses are 0 anyway)
      extra['group_ids'] = jnp.where(mask, extra['group_ids'], -1)
  if stage is not None:
    extra['stage'] = stage
  if sharpness_step is not None:
    extra['sharpness_step'] = sharpness_step
  perturbed_stats = []
  if keep_perturbed:
    extra['perturbed_aux'] = perturbed_stats
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  if perturbed_stats:
    new_stats = perturbed_stats[-1]
  params = optax.apply_updates(state.params, updates)

  loss_sum = jnp.sum(losses)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.tree.norm(params))
  hits = jnp.argmax(logits, -1) == labels
  if mask is None:
    count = jnp.asarray(labels.shape[0], jnp.int32)
  else:  # the weighted losses sum to B / count times the real examples' sum
    loss_sum, hits = loss_sum * (count / labels.shape[0]), hits & mask
  metrics = dict(loss_sum=loss_sum.astype(jnp.float32), correct=jnp.sum(hits).astype(jnp.int32),
                 count=count.astype(jnp.int32), finite=finite)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state)
  return new_state, metrics


MICROBATCH_AXIS = 'microbatch'


def _sum_metrics(metrics, reduce_sum):
  """Metric sums added over devices or microbatches; ``finite`` only if finite in all."""
  return dict(loss_sum=reduce_sum(metrics['loss_sum']), correct=reduce_sum(metrics['correct']),
              count=reduce_sum(metrics['count']),
              finite=reduce_sum(1 - metrics['finite'].astype(jnp.int32)) == 0)


def per_microbatch(step_fn, size: int, axis: str = MICROBATCH_AXIS):
  """Runs ``step_fn`` on every run of ``size`` consecutive examples of the batch (``vmap``).

  Every microbatch has its own clean pass, its own perturbation and its own
  BatchNorm statistics (ghost BatchNorm); the optimizer chain must average the
  direction across ``axis`` (``ssj.mean_across(axis)``), after which every
  microbatch's update is the same and the first is kept. The running statistics
  are averaged and the metric sums added over microbatches. The result depends
  on ``size`` only, not on how the batch lies on devices. On several devices
  run it inside :func:`per_device`: under a plain global ``jit`` the compiler
  gathers the activations of the vmapped convolutions across devices
  (``benchmarks/collectives.py``).
  """

  def step(state, batch):
    b = batch['label'].shape[0]
    if 'mask' in batch:  # each microbatch would weight by its own count (see train_step)
      raise ValueError('per_microbatch does not take padded batches (a mask); run the '
                       'partial batch unpadded.')
    if b % size:
      raise ValueError(f'batch of {b} examples does not split into microbatches of {size}.')
    split = jax.tree.map(lambda a: a.reshape((b // size, size) + a.shape[1:]), batch)
    new_states, metrics = jax.vmap(step_fn, in_axes=(None, 0), axis_name=axis)(state, split)
    new_state = jax.tree.map(lambda a: a[0], new_states)._replace(
        batch_stats=jax.tree.map(lambda a: jnp.mean(a, axis=0), new_states.batch_stats))
    return new_state, _sum_metrics(metrics, lambda a: jnp.sum(a, axis=0))

  return step


def per_device(step_fn, mesh, axis: str):
  """Runs ``step_fn`` on every device's shard of the batch (``shard_map``).

  The optimizer chain must average the direction across ``axis`` (see
  :func:`sse_sam_jax.mean_across`), so every device then applies the same update
  to its replicated state. BatchNorm statistics are per device in every pass;
  the running statistics are averaged, and the metric sums added, across devices.
  With FSDP-sharded state the step gathers the whole state onto every device
  on entry (the compiler inserts the all-gathers) and keeps its shard on exit.
  """
  from jax.sharding import PartitionSpec as P

  def local(state, batch):
    new_state, metrics = step_fn(state, batch)
    new_state = new_state._replace(
        batch_stats=jax.lax.pmean(new_state.batch_stats, axis))
    return new_state, _sum_metrics(metrics, lambda a: jax.lax.psum(a, axis))

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P()),
                       check_vma=False)


class CompiledTrainStep:
  """The training step, compiled ahead of time once per (stage, batch shape).

  ``boundaries`` are the stage switch's step boundaries (``[switch_step]`` for
  SSE-SAM, ``[]`` otherwise): the host picks the stage from its own step
  counter, so no step waits on the device. :meth:`precompile` builds every
  program before training starts; after that ``compiles`` stays fixed, the stage
  switch included (``compiles`` counts programs built, loaded or compiled). The
  state argument is donated. ``executable_cache``
  (:class:`~sse_sam_jax.train.executable_cache.ExecutableCache`) keeps the compiled
  programs on disk: a rerun loads them without tracing or compiling.
  ``compiler_options`` go to XLA with every program (see :func:`compiler_options`).

  ``state_sharding`` (a sharding or a tree of them, see
  :mod:`sse_sam_jax.train.sharding`) places the state, replicated or FSDP-style;
  ``per_device_axis`` runs the step per device (:func:`per_device`) and
  ``microbatch`` per run of that many examples (:func:`per_microbatch`).

  Several steps per dispatch: a batch whose arrays carry a leading axis of ``n``
  (labels ``[n, B]``) runs ``n`` consecutive steps in one program
  (:func:`scan_steps`), all in the stage of the first; its metrics are the sums
  over the ``n`` steps. For small models, whose steps are shorter than the
  host's work per dispatch, this keeps the accelerator busy.

  Cheaper sharpness-aware steps (``sharpness_steps``): ``sharpness_step_at``
  (``step -> True / False / None``, e.g. ``functools.partial(ssj.sharpness_step_at,
  direction)``) picks the kind of a single step on the host, one program per
  kind, as for stages; a dispatch of several steps leaves the choice to the
  program (``lax.cond``). ``running_stats`` is passed to :func:`train_step`.

  Building in the background: :meth:`precompile` with ``background_threads=n`` builds
  only the first program it is given before it returns; it traces and lowers every
  program on the calling thread and hands each one's compile (or load), as soon as it
  is lowered, to ``n`` threads (XLA compiles without holding Python's lock), in the
  order given: the first compiles while the others are lowered and beside the next
  ones, and the others go on while the first ones train. A step whose program
  is still being built waits for it (``wait_s`` counts those seconds); every program is
  still built once, before it first runs.
  """

  def __init__(self, model, tx, loss: PerExampleLoss, class_groups=None, *,
               boundaries=(), state_sharding=None, batch_sharding=None,
               per_device_axis: str | None = None, microbatch: int | None = None,
               sharpness_step_at=None, running_stats: str = 'clean',
               executable_cache=None, compiler_options: dict | None = None):
    self.executable_cache = executable_cache
    self.compiler_options = dict(compiler_options or {})
    self.sharpness_step_at = sharpness_step_at or (lambda step: None)
    self.boundaries = tuple(int(b) for b in boundaries)
    self.num_stages = len(self.boundaries) + 1
    self.batch_sharding = batch_sharding
    self._kwargs = {}
    if state_sharding is not None:
      self._kwargs = dict(in_shardings=(state_sharding, batch_sharding),
                          out_shardings=(state_sharding, None))

    def program(stage, kind):
      fn = functools.partial(train_step, model=model, tx=tx, loss=loss,
                             class_groups=class_groups,
                             stage=stage if self.num_stages > 1 else None,
                             sharpness_step=kind, running_stats=running_stats)
      if microbatch:
        fn = per_microbatch(fn, microbatch)
      if per_device_axis is not None:
        fn = per_device(fn, batch_sharding.mesh, per_device_axis)
      return fn

    self._program = program
    self._executables = {}
    self.compiles = 0
    self._pending, self._pool, self._lock = {}, None, threading.Lock()
    self.wait_s = 0.0  # seconds steps waited for programs built in the background
    self.built_in_background = 0  # programs handed to the background threads

  def stage_at(self, step: int) -> int:
    return optim_stage_at(step, self.boundaries)

  def kind_at(self, step: int, steps: int = 1):
    """``(stage, sharpness_step)`` of the program that runs ``steps`` steps from ``step``."""
    return self.stage_at(step), (self.sharpness_step_at(step) if steps == 1 else None)

  def _jit(self, kind, steps: int):
    fn, kwargs = self._program(*kind), dict(self._kwargs)
    if steps > 1:
      fn = scan_steps(fn)
      if kwargs:
        kwargs['in_shardings'] = (kwargs['in_shardings'][0], stacked(self.batch_sharding))
    return jax.jit(fn, donate_argnums=(0,), **kwargs)

  @staticmethod
  def _key(kind, batch):
    return (kind, tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items())))

  def _executable(self, kind, state, batch):
    key = self._key(kind, batch)
    if key in self._executables:
      return self._executables[key]
    compiled, pending = None, self._pending.get(key)
    if pending is not None:
      t0 = time.perf_counter()
      compiled = pending.result()
      self.wait_s += time.perf_counter() - t0
    for _ in range(2):  # None: a stored program failed to load (the file is gone now)
      if compiled is None:
        compiled = self._start(kind, state, batch)()
    return compiled

  def _start(self, kind, state, batch):
    """Starts building a program; returns the function that finishes it, and keeps the
    program, on any thread. Tracing and lowering read JAX's thread-local settings
    (``jax.enable_x64``, the matmul precision), so they happen here, on the caller's
    thread; XLA's compile, or the load of a stored program, is left to the function,
    which returns None where the stored program fails to load."""
    steps = batch['label'].shape[0] if batch['label'].ndim == 2 else 1
    cache, program = self.executable_cache, (kind, steps, sorted(self.compiler_options.items()))

    def keep(compiled):
      if compiled is not None:
        with self._lock:
          self._executables[self._key(kind, batch)] = compiled
          self.compiles += 1
      return compiled

    if cache is not None and cache.has(program, state, batch):
      return lambda: keep(cache.load(program, state, batch))
    lowered = self._jit(kind, steps).lower(state, batch)

    def compile_lowered():
      compiled, compiled_here = executable_cache_lib.compile_lowered(
          lowered, self.compiler_options)
      if cache is not None and compiled_here:
        cache.store(program, state, batch, compiled)
      return keep(compiled)

    return compile_lowered

  def precompile(self, state, batch_shapes=(), *, programs=(),
                 background_threads: int = 0) -> float:
    """Builds every stage for every batch shape of ``batch_shapes`` (both kinds of
    step where ``sharpness_step_at`` chooses), then the ``((stage, sharpness_step),
    batch shape)`` pairs of ``programs``, in that order; returns the seconds it took.
    With ``background_threads`` only the first is built before it returns; the others
    are lowered here and compiled in that many threads (see the class docs;
    :meth:`finish_background`)."""
    t0 = time.perf_counter()
    state_spec = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        state)
    kinds = (None,) if self.sharpness_step_at(0) is None else (True, False)
    pairs = [((stage, kind), b) for b in batch_shapes for stage in range(self.num_stages)
             for kind in kinds] + list(programs)
    if background_threads < 1 or not pairs:
      for kind, batch in pairs:
        self._executable(kind, state_spec, batch)
      return time.perf_counter() - t0
    # Each program's compile (or load) starts in a thread as soon as it is lowered, the
    # first one's included: the first compiles while the caller lowers the others, and
    # the next ones compile beside it rather than after it.
    (first_kind, first_batch), = pairs[:1]
    first = self._key(first_kind, first_batch)
    for kind, batch in pairs:
      key = self._key(kind, batch)
      if key in self._executables or key in self._pending:
        continue
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            int(background_threads), thread_name_prefix='compile')
      self._pending[key] = self._pool.submit(self._start(kind, state_spec, batch))
      self.built_in_background += key != first
    pending = self._pending.pop(first, None)
    if pending is not None:
      pending.result()  # None where a stored program failed to load: built below
    self._executable(first_kind, state_spec, first_batch)
    return time.perf_counter() - t0

  def finish_background(self, cancel: bool = False) -> None:
    """Waits for the programs still being built; ``cancel`` (a run that ends early on
    an error or a signal) drops those not started and does not wait."""
    if self._pool is not None:
      self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
      self._pool = None
    self._pending = {k: f for k, f in self._pending.items()
                     if not f.cancelled() and k not in self._executables}

  def __call__(self, state: TrainState, batch: dict, step: int):
    """Runs step number ``step`` (a host int: the count of steps done before it), or the
    ``n`` steps from ``step`` on for a batch of ``n`` stacked batches."""
    steps = batch['label'].shape[0] if batch['label'].ndim == 2 else 1
    kind = self.kind_at(step, steps)
    if steps > 1 and self.stage_at(step + steps - 1) != kind[0]:
      raise ValueError(f'the {steps} steps from step {step} cross a stage '
                       f'boundary ({self.boundaries}); split the dispatch there.')
    return self._executable(kind, state, batch)(state, batch)


def scan_steps(step_fn):
  """``step_fn`` over stacked batches (``lax.scan``): ``n`` steps in one program, the
  metric sums added over them (``finite`` only if every step was).

  On XLA:CPU the loop is unrolled: a rolled loop's body ran ~10x slower there (the
  1D CNN of the main job: 1.2k against 11k examples/s); GPUs and TPUs run it rolled,
  so its compile time does not grow with ``n``.
  """

  def train_steps(state, batches):
    unroll = jax.default_backend() == 'cpu'
    state, metrics = jax.lax.scan(step_fn, state, batches, unroll=unroll)
    return state, _sum_metrics(metrics, lambda a: jnp.sum(a, axis=0))

  return train_steps


def stacked(sharding):
  """The sharding of ``n`` stacked batches: the batch's sharding behind a leading axis."""
  if sharding is None:
    return None
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))
