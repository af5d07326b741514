"""The training loop: data -> grain pipeline -> one jitted sharded step -> metrics, checkpoints.

``train(config, workdir)`` claims the workdir (:mod:`sse_sam_jax.train.workdir`),
builds the run (:mod:`sse_sam_jax.train.setup`), restores the newest intact
checkpoint (:mod:`sse_sam_jax.train.resume`), builds every program the run needs
(the later ones, with ``background_compile_threads``, while the first trains), then
loops. The loop body is one dispatch of one or several steps
(:mod:`sse_sam_jax.train.dispatch`); everything periodic is a small action object
(in the manner of CommonLoopUtils' periodic actions):
:class:`MetricReport` every ``log_every_steps`` steps (metric lines and the NaN
stop, read one interval late, so the loop syncs with the device only at epoch ends),
:class:`Evaluation`, :class:`HessianProbe` and :class:`Checkpointer` at epoch ends.
One ``try/finally`` closes the checkpoints, the logs and grain's workers whatever
ends the loop. SIGTERM (a preempted VM) saves
a checkpoint at the current step and stops; the rerun resumes from it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import threading
import time

import jax

from sse_sam_jax import data as data_lib
from sse_sam_jax.data import augment as augment_lib
from sse_sam_jax.train import commands, dispatch, resume, setup
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import evaluate as eval_lib
from sse_sam_jax.train import step as step_lib
from sse_sam_jax.train import workdir as workdir_lib
from sse_sam_jax.train.checkpointing import Checkpoints
from sse_sam_jax.train.executable_cache import ExecutableCache
from sse_sam_jax.train.run_log import MetricLog, plot_per_class
from sse_sam_jax.train.step import CompiledTrainStep


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


def train(c, workdir, *, progress: bool = True, stop_after_steps: int | None = None,
          restart: bool = False) -> dict:
  """Trains from ``c`` in ``workdir`` (resuming from its last checkpoint) and evaluates.

  The workdir is claimed first (:func:`sse_sam_jax.train.workdir.claim`): a lock
  against a second process, and the saved config against this one. A finished
  run's results are returned as saved, without building or compiling anything.
  ``restart`` moves an existing run aside and starts fresh. ``stop_after_steps``
  stops early (as if killed) after that many steps; for tests. Returns the
  final metrics (test, and val if held out); ``{'stopped_at': step, 'compile_s': ...}`` for a
  run stopped early or by SIGTERM (``'preempted': True``).
  """
  config_lib.validate(c)
  workdir = workdir_lib.as_path(workdir)  # local, or any filesystem epath reaches (gs://)
  # Multi-host: the first host claims the (shared) workdir for all of them.
  lock = workdir_lib.claim(workdir, c.to_dict(), restart=restart,
                                defaults=config_lib.default_config().to_dict()) \
      if jax.process_index() == 0 else None
  try:
    finished = resume.finished_result(workdir)
    if finished is not None:
      print(f'{workdir} finished at step {finished["total_steps"]}; its results:')
      return finished
    return _train(c, workdir, progress, stop_after_steps)
  finally:
    if lock is not None:
      lock.release()


# ----------------------------------------------------------------------------
# Periodic actions
# ----------------------------------------------------------------------------
class MetricReport:
  """Every ``every`` steps (and at epoch ends): the metric sums of the interval, a NaN/Inf
  stop, and a log line with where the time went: ``wall_s`` (since the loop started),
  ``step_s`` (seconds per step), ``examples_per_s`` and ``data_wait_frac`` (the share of
  the loop's time spent waiting for the next batch and putting it on the devices).

  The loop never waits for the device inside an epoch: an interval's sums start
  copying to the host when it closes and are read when the next one closes, so its
  line (and its NaN check) comes one interval late. At an epoch's end every open
  interval is read before anything else happens, so no evaluation or checkpoint
  ever sees parameters that a NaN check has not passed.
  """

  def __init__(self, c, log: MetricLog, checkpoints: Checkpoints, workdir, total_steps: int):
    self.every, self.log = c.log_every_steps, log
    self.checkpoints, self.workdir = checkpoints, workdir
    self.total_steps = total_steps
    self.pending, self.steps, self.examples, self.data_s = [], 0, 0, 0.0
    self.in_flight = None
    self.start = self.last = time.perf_counter()
    self.totals = {'examples': 0, 'data_wait_s': 0.0, 'steps': 0}

  def add(self, metrics, examples: int, data_seconds: float, steps: int = 1):
    self.pending.append(metrics)
    self.steps += steps
    self.examples += examples
    self.data_s += data_seconds

  def pause(self, seconds: float):
    """Time spent outside the steps (evaluation, checkpoints): not counted as step time."""
    self.last += seconds

  def __call__(self, step: int, epoch: int, epoch_end: bool, bar) -> None:
    if self.steps < self.every and not epoch_end:
      return
    if not self.steps:  # nothing since the last interval closed
      self.flush(bar)
      return
    for metrics in self.pending:
      for value in metrics.values():
        value.copy_to_host_async()
    closed = (step, epoch, self.steps, self.examples, self.data_s, self.pending)
    for key, value in (('examples', self.examples), ('data_wait_s', self.data_s),
                       ('steps', self.steps)):
      self.totals[key] += value
    self.pending, self.steps, self.examples, self.data_s = [], 0, 0, 0.0
    previous, self.in_flight = self.in_flight, closed
    if previous is not None:
      self._write(*previous, bar)
    if epoch_end:
      self.flush(bar)

  def flush(self, bar) -> None:
    """Reads the interval still in flight (a host sync)."""
    if self.in_flight is not None:
      closed, self.in_flight = self.in_flight, None
      self._write(*closed, bar)

  def _write(self, step, epoch, steps, examples, data_s, pending, bar):
    summed = jax.device_get(pending)
    # Timed from read to read: a read waits for the device, so the interval is the
    # device's when it sets the pace and the host's when the host does.
    now = time.perf_counter()
    interval = max(now - self.last, 1e-9)
    self.last = now
    timing = dict(wall_s=round(now - self.start, 3), step_s=interval / steps,
                  examples_per_s=examples / interval,
                  data_wait_frac=min(1.0, data_s / interval))
    if not all(bool(m['finite']) for m in summed):
      kept = self.checkpoints.latest_step()
      kept = (f'the last good checkpoint (step {kept}) is kept in {self.workdir}' if kept
              is not None else 'no checkpoint was written yet')
      raise NonFiniteLossError(
          f'non-finite loss or parameters before step {step}; stopped; {kept}. The '
          'inputs were checked finite when loaded: lower the learning rate or the radius.')
    n = sum(int(m['count']) for m in summed)
    loss = sum(float(m['loss_sum']) for m in summed) / n
    accuracy = sum(int(m['correct']) for m in summed) / n
    eta = (self.total_steps - step) * timing['step_s']
    bar.set_postfix(loss=f'{loss:.4f}', acc=f'{100 * accuracy:.1f}',
                    ex_s=f"{timing['examples_per_s']:.0f}",
                    eta=time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.log.write(step, train_loss=loss, train_accuracy=accuracy, epoch=epoch + 1, **timing)


class Evaluation:
  """Every ``eval.every_epochs`` epochs and at the end: val/test metrics, and the
  model-selection score (balanced accuracy on ``eval.select_on``)."""

  def __init__(self, c, run: setup.Run, log: MetricLog):
    self.c, self.run, self.log = c, run, log
    self.predict = eval_lib.make_predict(run.model, c.eval.flip_tta)
    self.seconds = 0.0

  def evaluate(self, state, split):
    return eval_lib.evaluate(self.predict, state.params, state.batch_stats, split,
                             self.run.stats, self.c.eval.batch_size,
                             batch_sharding=self.run.batch_sharding)

  def __call__(self, step, epochs_done, last, state):
    if not (last or epochs_done % self.c.eval.every_epochs == 0):
      return {}, None
    t0 = time.perf_counter()
    scalars = {}
    for name, split in (('val', self.run.data.val), ('test', self.run.data.test)):
      if split is not None:
        m = self.evaluate(state, split)
        scalars.update({f'{name}_{k}': m[k] for k in ('all', 'balanced', 'many', 'medium', 'few')})
    score = None
    if self.c.eval.select_on != 'none':  # balanced accuracy: the val split is long-tailed
      score = scalars.get(f'{self.c.eval.select_on}_balanced')
    self.seconds += time.perf_counter() - t0
    self.log.write(step, eval_seconds=round(time.perf_counter() - t0, 3), **scalars)
    return scalars, score


class HessianProbe:
  """Every ``hessian.every_epochs`` epochs (0: never): head/tail lambda_min/max."""

  def __init__(self, c, run: setup.Run, log: MetricLog):
    self.c, self.run, self.log = c, run, log

  def __call__(self, step, epochs_done, last, state):
    h = self.c.hessian
    if not h.every_epochs or not (last or epochs_done % h.every_epochs == 0):
      return
    subset = commands.hessian_subset(self.run.data.train, h.max_examples, h.seed)
    self.log.write(step, epoch=epochs_done, **commands.head_tail_extremes(
        self.run, state, subset, self.c.optimizer.eta, h.lanczos_iters, h.seed))


class Checkpointer:
  """Every ``checkpoint.every_epochs`` epochs, at the end, and when asked to (SIGTERM)."""

  def __init__(self, c, checkpoints: Checkpoints, layout: dict):
    self.c, self.checkpoints, self.layout = c, checkpoints, layout
    self.seconds = 0.0

  def __call__(self, step, epochs_done, last, state, data_state, scalars=None, score=None,
               force=False):
    if not (force or last or epochs_done % self.c.checkpoint.every_epochs == 0):
      return
    t0 = time.perf_counter()
    meta = {'epoch': epochs_done, **self.layout,
            **{k: float(v) for k, v in (scalars or {}).items()}}
    self.checkpoints.save(step, state, data_state, meta, score)
    self.seconds += time.perf_counter() - t0


@contextlib.contextmanager
def sigterm_flag():
  """Yields a list that becomes non-empty when SIGTERM arrives (main thread only).

  Ctrl-C (SIGINT) is taken the same way: the loop raises ``KeyboardInterrupt`` at
  the next step boundary, so the interrupt never lands inside a library's
  ``__del__`` (where Python ignores it and the run would go on); a second Ctrl-C
  raises at once."""
  received, interrupted = [], []
  if threading.current_thread() is not threading.main_thread():
    yield received, interrupted
    return

  def on_sigint(signum, frame):
    del frame
    if interrupted:
      raise KeyboardInterrupt
    interrupted.append(signum)

  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  previous_int = signal.signal(signal.SIGINT, on_sigint)
  try:
    yield received, interrupted
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def _train(c, workdir, progress: bool, stop_after_steps: int | None) -> dict:
  cache_dir = use_compilation_cache(c.compilation_cache_dir, workdir)
  run = setup.prepare(c)
  spe, total_steps = run.steps_per_epoch, c.epochs * run.steps_per_epoch
  n_dev = run.mesh.devices.size
  executables = _executable_cache(c, run, cache_dir)
  train_step = CompiledTrainStep(
      run.model, run.tx, run.loss, run.class_groups, boundaries=run.boundaries,
      state_sharding=run.state_sharding, batch_sharding=run.batch_sharding,
      per_device_axis=run.scope.per_device_axis, microbatch=run.scope.microbatch,
      sharpness_step_at=run.sharpness_step_at, running_stats=c.model.running_stats,
      executable_cache=executables,
      compiler_options=step_lib.compiler_options(c.cpu_convolutions))
  layout = dict(run.scope.layout(c, n_dev), model_signature=resume.model_signature(run.state))
  checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep)
  log, batch_iter = None, None
  try:
    state, start_step = run.state, 0
    restored = resume.restore_newest_intact(checkpoints, state, c, n_dev)
    if restored is not None:
      state, data_state, _ = restored
      start_step = int(data_state['next_index'])
      print(f'Resumed from step {start_step} (epoch {start_step // spe}).')
    batch_iter = iter(data_lib.train_batches(
        run.data.train, run.spec, num_epochs=c.epochs, seed=c.seed,
        augment=augment_lib.pad_crop_flip if c.data.augment else None,  # lazy: RRC + flip
        num_workers=c.data.num_workers, prefetch_batches=c.data.prefetch_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count()))
    if start_step:
      batch_iter.set_state({'next_index': start_step})
    plan = dispatch.DispatchPlan(dispatch.steps_per_dispatch(c), spe,
                                 run.spec.full_batches(len(run.data.train)), run.boundaries)
    needed = dispatch.programs(run, plan.dispatches(start_step, total_steps), train_step)
    first_compile_s = train_step.precompile(
        state, programs=needed, background_threads=dispatch.background_compile_threads(c))
    log = MetricLog(workdir)
    log.discard_after(start_step)
    later = train_step.built_in_background
    print(f'{c.data.name}: {len(run.data.train)} train examples, class counts '
          f'{run.stats.counts.min()}..{run.stats.counts.max()}, {spe} steps/epoch; '
          f'{c.optimizer.name}, {n_dev} device(s); {len(needed) - later} program(s) built '
          f'in {first_compile_s:.1f}s{_loaded_note(executables)}'
          + (f', {later} more in the background.' if later > 0 else '.'))
    report = MetricReport(c, log, checkpoints, workdir, total_steps)
    evaluation = Evaluation(c, run, log)
    epoch_actions = (HessianProbe(c, run, log),)
    checkpointer = Checkpointer(c, checkpoints, layout)

    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    step, t_start = start_step, time.perf_counter()
    with sigterm_flag() as (sigterm, interrupted):
      while step < total_steps:
        epoch = step // spe
        epoch_end = (epoch + 1) * spe
        bar = tqdm(total=spe, initial=step - epoch * spe, desc=f'epoch {epoch + 1}/{c.epochs}',
                   disable=not progress, leave=False)
        while step < epoch_end:
          n = plan.steps_from(step, stop_after_steps)
          t0 = time.perf_counter()
          host_batches = [next(batch_iter) for _ in range(n)]
          examples = sum(len(b['label']) for b in host_batches) * jax.process_count()
          batch = dispatch.device_batch(host_batches, step, run)  # (padded: see setup)
          del host_batches  # (batches in grain's shared memory are freed when dropped)
          data_s = time.perf_counter() - t0
          waited = train_step.wait_s
          state, metrics = train_step(state, batch, step)
          report.pause(train_step.wait_s - waited)  # a program built in the background
          report.add(metrics, examples, data_s, steps=n)
          step += n
          bar.update(n)
          report(step, epoch, step == epoch_end, bar)
          if interrupted:
            raise KeyboardInterrupt(f'Ctrl-C at step {step}; rerun the same command to resume '
                                    'from the last checkpoint.')
          if sigterm or (stop_after_steps is not None and step >= stop_after_steps):
            break
        if step < epoch_end:  # stopped inside the epoch: its open intervals are read too
          report(step, epoch, True, bar)
        bar.close()
        if sigterm:
          checkpointer(step, step // spe, False, state, batch_iter.get_state(), force=True)
          print(f'SIGTERM: checkpoint saved at step {step} in {workdir}; rerun the same command '
                'to resume.', flush=True)
          return {'stopped_at': step, 'preempted': True,
                  'compile_s': first_compile_s + train_step.wait_s}
        if stop_after_steps is not None and step >= stop_after_steps:
          t0 = time.perf_counter()
          train_step.finish_background()  # every program built (and stored) for the resume
          return {'stopped_at': step,
                  'compile_s': first_compile_s + train_step.wait_s + time.perf_counter() - t0}
        epochs_done, last = step // spe, step >= total_steps
        t0 = time.perf_counter()
        scalars, score = evaluation(step, epochs_done, last, state)
        for action in epoch_actions:
          action(step, epochs_done, last, state)
        checkpointer(step, epochs_done, last, state, batch_iter.get_state(), scalars, score)
        report.pause(time.perf_counter() - t0)
    checkpoints.wait()
    loop_s = time.perf_counter() - t_start
    compile_s = first_compile_s + train_step.wait_s  # what the run waited for programs
    timing = {'compile_s': round(compile_s, 3), 'loop_s': round(loop_s, 3),
              'eval_s': round(evaluation.seconds, 3),
              'checkpoint_s': round(checkpointer.seconds, 3),
              'data_wait_s': round(report.totals['data_wait_s'], 3),
              'steps': report.totals['steps'], 'examples': report.totals['examples'],
              'programs_loaded': executables.loaded if executables is not None else 0,
              'programs_built_in_background': train_step.built_in_background}
    step_s = loop_s - evaluation.seconds - checkpointer.seconds - train_step.wait_s
    timing['examples_per_s'] = round(report.totals['examples'] / max(step_s, 1e-9), 1)
    return _final_results(c, run, evaluation, state, workdir, total_steps, loop_s,
                          train_step.compiles, timing)
  finally:
    train_step.finish_background(cancel=True)  # (after an error or a signal)
    checkpoints.wait()
    checkpoints.close()
    if log is not None:
      log.close()
    if batch_iter is not None and hasattr(batch_iter, 'close'):
      batch_iter.close()  # grain's prefetch threads and worker processes
      # Batches from worker processes live in shared memory, unlinked when their last
      # reference goes; some sit in reference cycles (grain's iterator state), which
      # only a collection frees. Without it they outlive the run ("leaked shared_memory
      # objects" at exit, and /dev/shm fills up over many runs in one process).
      del batch_iter
      gc.collect()
      data_lib.wait_for_shared_memory_release()  # unlinked before the process may exit


def _executable_cache(c, run: setup.Run, cache_dir) -> ExecutableCache | None:
  """The train step's serialized programs beside JAX's cache (local folders only), keyed
  by what is trained: a resume that changes a neutral key (logging, evaluation, workers,
  read-ahead) loads the same programs; devices and shardings are in the key anyway."""
  if cache_dir is None or not workdir_lib.is_local(cache_dir):
    return None
  trained = {k: v for k, v in workdir_lib.flatten(c.to_dict()).items()
             if not workdir_lib.is_neutral(k)}
  return ExecutableCache(cache_dir / 'executables', {
      'config': trained, 'class_counts': run.stats.counts.tolist(),
      'train_examples': len(run.data.train), 'example_shape': run.data.train.x.shape[1:]})


def _loaded_note(executables) -> str:
  if executables is None or not executables.loaded:
    return ''
  return f' ({executables.loaded} loaded from {executables.directory})'


def use_compilation_cache(setting: str, workdir):
  """JAX's persistent compilation cache: ``'workdir'`` (default) keeps it in
  ``workdir/compilation_cache``, so a rerun or resume loads its programs instead of
  compiling them; a path puts it there (share one across runs); ``''`` turns it off.
  Returns the folder (None when off); the trainer keeps its serialized training
  programs in its ``executables/`` (:mod:`sse_sam_jax.train.executable_cache`)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = None if not setting else (workdir / 'compilation_cache' if setting == 'workdir'
                                   else workdir_lib.as_path(setting))
  if jax.config.jax_compilation_cache_dir != (str(path) if path else None):
    compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', str(path) if path else None)
  if path is not None:
    path.mkdir(parents=True, exist_ok=True)  # (again, after a --restart moved it)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  return path


def throughput_line(timing: dict) -> str:
  return (f"throughput: {timing['examples_per_s']:.0f} examples/s over {timing['steps']} steps; "
          f"loop {timing['loop_s']:.1f}s (data wait {timing['data_wait_s']:.1f}s, eval "
          f"{timing['eval_s']:.1f}s, checkpoints {timing['checkpoint_s']:.1f}s), compile "
          f"{timing['compile_s']:.1f}s" + (
              f" ({timing['programs_built_in_background']} program(s) built in the background)"
              if timing.get('programs_built_in_background') else ''))


def _final_results(c, run, evaluation, state, workdir, total_steps, train_seconds, compiles,
                   timing):
  result = {'config': c.to_dict(), 'train_seconds': train_seconds, 'total_steps': total_steps,
            'class_counts': run.stats.counts.tolist(), 'compiles': compiles, 'timing': timing,
            'throughput': throughput_line(timing)}
  for name, split in (('val', run.data.val), ('test', run.data.test)):
    if split is not None:
      result[name] = evaluation.evaluate(state, split)
  result['table'] = eval_lib.format_table({c.optimizer.name: result['test']})
  if jax.process_index() == 0:
    (workdir / 'results.json').write_text(json.dumps(result, indent=1))
    plot_per_class(result['test']['per_class'], run.stats.counts,
                   workdir / 'per_class_accuracy.png', f'{c.data.name}, {c.optimizer.name}')
  result['state'] = state  # not in results.json
  return result
