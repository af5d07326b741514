"""The train step compiled ahead of time: one program per optimizer stage (and kind of
step, batch shape and steps per dispatch), an executable cache, programs built in
background threads, and the dispatch of one or several steps."""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sse_sam_jax.optim import stage_at as optim_stage_at
from sse_sam_jax.train import executable_cache as executable_cache_lib
from sse_sam_jax.train.step import (
  PerExampleLoss,
  TrainState,
  _sum_metrics,
  per_device,
  per_microbatch,
  train_step,
)

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
  program (``lax.cond``). ``running_stats`` is passed to :func:`train_step`; a callable
  ``stage -> running_stats`` gives each stage's (a reference's pass order per stage).

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
               sharpness_step_at=None, running_stats: str | tuple | Callable = 'clean',
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
                             sharpness_step=kind,
                             running_stats=running_stats(stage) if callable(running_stats)
                             else running_stats)
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
