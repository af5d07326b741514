"""The training loop: data -> grain pipeline -> one jitted sharded step -> metrics, checkpoints.

``train(config, workdir)`` claims the workdir (:mod:`sse_sam_jax.train.workdir`),
builds the run (:mod:`sse_sam_jax.train.setup`), restores the newest intact
checkpoint (:mod:`sse_sam_jax.train.resume`), builds every program the run needs
(the later ones, with ``background_compile_threads``, while the first trains), then
loops. The loop body is one dispatch of one or several steps
(:mod:`sse_sam_jax.train.dispatch`); everything periodic is a small action object
(in the manner of CommonLoopUtils' periodic actions, :mod:`sse_sam_jax.train.periodic`):
:class:`MetricReport` every ``log_every_steps`` steps (metric lines and the NaN
stop, read one interval late, so the loop syncs with the device only at epoch ends),
:class:`Evaluation`, :class:`HessianProbe` and :class:`Checkpointer` at epoch ends.
One ``try/finally`` closes the checkpoints, the logs and grain's workers whatever
ends the loop. SIGTERM (a preempted VM) saves
a checkpoint at the current step and stops, on a multi-host run at the same step on every
host (:class:`~sse_sam_jax.train.periodic.PreemptionAgreement`); the rerun resumes from it.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import time

import jax

from sse_sam_jax import data as data_lib
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import dispatch, logs, resume, setup
from sse_sam_jax.train import evaluate as eval_lib
from sse_sam_jax.train import provenance as provenance_lib
from sse_sam_jax.train import workdir as workdir_lib
from sse_sam_jax.train.checkpointing import Checkpoints
from sse_sam_jax.train.compiled_step import CompiledTrainStep, compiler_options
from sse_sam_jax.train.executable_cache import ExecutableCache
from sse_sam_jax.train.periodic import (
    Checkpointer,
    Evaluation,
    HessianProbe,
    MetricReport,
    PreemptionAgreement,
    sigterm_flag,
)
from sse_sam_jax.train.run_log import MetricLog, plot_per_class

logger = logging.getLogger(__name__)


def train(c, workdir, *, progress: bool = True, stop_after_steps: int | None = None,
          restart: bool = False) -> dict:
  """Trains from ``c`` in ``workdir`` (resuming from its last checkpoint) and evaluates.

  The workdir is claimed first (:func:`sse_sam_jax.train.workdir.claim`): a lock
  against a second process, and the saved config against this one. A finished
  run's results are returned as saved, without building or compiling anything.
  ``restart`` moves an existing run aside and starts fresh. ``stop_after_steps``
  stops early (as if killed) after that many steps; for tests. Returns the
  final metrics (test, and val if held out); ``{'stopped_at': step, 'compile_s': ...}`` for a
  run stopped early, by SIGTERM (``'preempted': True``) or by Ctrl-C (``'interrupted':
  True``), both after saving a checkpoint at that step.
  """
  logs.ensure_setup()
  config_lib.validate(c)
  workdir = workdir_lib.as_path(workdir)  # local, or any filesystem epath reaches (gs://)
  # Multi-host: the first host claims the (shared) workdir for all of them.
  lock = workdir_lib.claim(workdir, c.to_dict(), restart=restart,
                           defaults=config_lib.default_config().to_dict(),
                           started=lambda: resume.has_checkpoint(workdir)) \
      if jax.process_index() == 0 else None
  try:
    finished = resume.finished_result(workdir)
    if finished is not None:
      logger.info('%s finished at step %d; its results:', workdir, finished['total_steps'])
      return finished
    with setup.precision(c):
      return _train(c, workdir, progress, stop_after_steps)
  finally:
    if lock is not None:
      lock.release()


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
      sharpness_step_at=run.sharpness_step_at, running_stats=run.running_stats,
      executable_cache=executables,
      compiler_options=compiler_options(c.cpu_convolutions))
  layout = dict(run.scope.layout(c, n_dev), model_signature=resume.model_signature(run.state))
  checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep,
                            track_best=c.eval.select_on != 'none')
  log, batch_iter = None, None
  try:
    state, start_step = run.state, 0
    restored = resume.restore_newest_intact(checkpoints, state, c, n_dev)
    if restored is not None:
      state, data_state, _ = restored
      start_step = int(data_state['next_index'])
      logger.info('Resumed from step %d (epoch %d).', start_step, start_step // spe)
    order = (data_lib.load_batch_order(c.data.batch_order, c.epochs, len(run.data.train))
             if c.data.batch_order else None)
    batch_iter = iter(dispatch.train_batches(c, run, order))
    if start_step:
      batch_iter.set_state({'next_index': start_step})
    plan = dispatch.plan(c, run)
    needed = dispatch.programs(run, plan.dispatches(start_step, total_steps), train_step)
    first_compile_s = train_step.precompile(
        state, programs=needed, background_threads=dispatch.background_compile_threads(c))
    if run.device_images is not None:  # (small programs: the batches' gather and crops)
      t0 = time.perf_counter()
      run.device_images.precompile([batch for _, batch in needed])
      first_compile_s += time.perf_counter() - t0
    log = MetricLog(workdir)
    log.discard_after(start_step)
    later = train_step.built_in_background
    logger.info(f'{c.data.name}: {len(run.data.train)} train examples, class counts '
          f'{run.stats.counts.min()}..{run.stats.counts.max()}, {spe} steps/epoch; '
          f'{c.optimizer.name}, {n_dev} device(s); {len(needed) - later} program(s) built '
          f'in {first_compile_s:.1f}s{_loaded_note(executables)}'
          + (f', {later} more in the background.' if later > 0 else '.'))
    if run.device_images is not None:
      logger.info('Augmentation on the device (data.augment_on=%s): the training images, '
                  '%.1f MB, on every device.', c.data.augment_on, run.device_images.nbytes / 1e6)
    report = MetricReport(c, log, checkpoints, workdir, total_steps, spe)
    evaluation = Evaluation(c, run, log)
    epoch_actions = (HessianProbe(c, run, log),)
    checkpointer = Checkpointer(c, checkpoints, layout)

    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    step, t_start = start_step, time.perf_counter()
    preemption = PreemptionAgreement()  # multi-host: every host stops at the same step
    with sigterm_flag(leave_sigterm=preemption.active) as (sigterm, interrupted):
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
          if preemption():
            sigterm.append(signal.SIGTERM)
          if sigterm or interrupted or (stop_after_steps is not None
                                        and step >= stop_after_steps):
            break
        if step < epoch_end:  # stopped inside the epoch: its open intervals are read too
          report(step, epoch, True, bar)
        bar.close()
        if sigterm or interrupted:  # a preempted VM, or Ctrl-C: save the step, then stop
          checkpointer(step, step // spe, False, state, batch_iter.get_state(), force=True)
          checkpointer.wait(step)
          logger.info('%s: checkpoint saved at step %d in %s; rerun the same command to '
                      'resume.', 'SIGTERM' if sigterm else 'Ctrl-C', step, workdir)
          return {'stopped_at': step, 'preempted': bool(sigterm), 'interrupted': not sigterm,
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
    checkpointer.wait(step)
    loop_s = time.perf_counter() - t_start
    compile_s = first_compile_s + train_step.wait_s  # what the run waited for programs
    timing = {'compile_s': round(compile_s, 3), 'loop_s': round(loop_s, 3),
              # (the part of compile_s inside loop_s: steps waiting for programs built
              # in the background)
              'compile_wait_in_loop_s': round(train_step.wait_s, 3),
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
  return ExecutableCache(cache_dir / 'executables', program_fingerprint(c, run))


def program_fingerprint(c, run: setup.Run) -> dict:
  """What the train step's programs are built from, beyond the environment and the
  state's and batches' specs: every config key that alters training, and what the data
  bake into the program (class counts: tail mask, class weights, LDAM margins; the
  training set's size and example shape)."""
  trained = {k: v for k, v in workdir_lib.flatten(c.to_dict()).items()
             if not workdir_lib.is_neutral(k)}
  return {'config': trained, 'class_counts': run.stats.counts.tolist(),
          'train_examples': len(run.data.train),
          'example_shape': list(run.data.train.x.shape[1:]),
          'example_dtype': str(run.data.train.x.dtype)}


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
  path = None if not setting else (workdir / workdir_lib.CACHE_DIR if setting == 'workdir'
                                   else workdir_lib.as_path(setting))
  if jax.config.jax_compilation_cache_dir != (str(path) if path else None):
    compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', str(path) if path else None)
  if path is not None:
    path.mkdir(parents=True, exist_ok=True)
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
  result = {'config': c.to_dict(), 'provenance': provenance_lib.provenance(c.to_dict()),
            'train_seconds': train_seconds, 'total_steps': total_steps,
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
