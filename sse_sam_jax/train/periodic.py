"""What the training loop does besides the step, each a small object called at its
boundaries (in the manner of CommonLoopUtils' periodic actions): :class:`MetricReport`
every ``log_every_steps`` steps, :class:`Evaluation`, :class:`HessianProbe` and
:class:`Checkpointer` at epoch ends, and :func:`sigterm_flag` for preemption and Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
import time

import jax

from sse_sam_jax.train import commands, setup
from sse_sam_jax.train import evaluate as eval_lib
from sse_sam_jax.train.checkpointing import Checkpoints
from sse_sam_jax.train.run_log import MetricLog


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


class MetricReport:
  """Every ``every`` steps of an epoch (and at its end): the metric sums of the interval, a NaN/Inf
  stop, and a log line with where the time went: ``wall_s`` (since the loop started),
  ``step_s`` (seconds per step), ``examples_per_s`` and ``data_wait_frac`` (the share of
  the loop's time spent waiting for the next batch and putting it on the devices).

  The loop never waits for the device inside an epoch: an interval's sums start
  copying to the host when it closes and are read when the next one closes, so its
  line (and its NaN check) comes one interval late. At an epoch's end every open
  interval is read before anything else happens, so no evaluation or checkpoint
  ever sees parameters that a NaN check has not passed.

  Intervals end where the epoch's step count crosses a multiple of ``every``, whatever
  step the loop started from: a run resumed mid-epoch logs at the same steps as one
  never interrupted (plus the step it stopped at).
  """

  def __init__(self, c, log: MetricLog, checkpoints: Checkpoints, workdir, total_steps: int,
               steps_per_epoch: int):
    self.every, self.log = c.log_every_steps, log
    self.steps_per_epoch = steps_per_epoch
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
    in_epoch = step - epoch * self.steps_per_epoch
    if not epoch_end and in_epoch // self.every == (in_epoch - self.steps) // self.every:
      return  # no multiple of `every` crossed since the interval opened
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
        scalars.update({f'{name}_{k}': m[k] for k in ('all', 'balanced', 'many', 'medium', 'few')
                        if m[k] is not None})  # (a shot group absent from the split)
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
    with self._disk_full_named(step):
      self.checkpoints.save(step, state, data_state, meta, score)
    self.seconds += time.perf_counter() - t0

  def wait(self, step):
    """Waits for the asynchronous saves (a full disk named as such)."""
    with self._disk_full_named(step):
      self.checkpoints.wait()

  @contextlib.contextmanager
  def _disk_full_named(self, step):
    """A full disk during a save (Orbax's error, or a later one of its asynchronous
    save) becomes one :class:`DiskFullError` naming the intact checkpoint."""
    steps = self.checkpoints.steps()
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (Orbax wraps I/O errors variously)
      if not disk_full(e):
        raise
      kept = [s for s in steps if s != step]
      intact = (f'the checkpoint of step {kept[0]} is intact' if kept
                else 'no earlier checkpoint exists')
      raise DiskFullError(f'the disk is full: a checkpoint (step {step} or the one before) '
                          f'could not be written to {self.checkpoints.directory}; {intact}. '
                          'Free space and rerun the same command to resume.') from None


class DiskFullError(RuntimeError):
  """No space left for a checkpoint; the newest intact one is named in the message."""


def disk_full(error: BaseException) -> bool:
  """Whether ``error`` (or what caused it) is a full disk: ``ENOSPC``, or Orbax's and
  TensorStore's wrappings of it."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    text = str(error)
    if 'No space left on device' in text or 'RESOURCE_EXHAUSTED' in text:
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def sigterm_flag(leave_sigterm: bool = False):
  """Yields two lists: the first becomes non-empty when SIGTERM arrives, the second on
  Ctrl-C (main thread only).

  Ctrl-C (SIGINT) is taken the same way: the loop saves a checkpoint at the next step
  boundary and stops (the interrupt never lands inside a library's ``__del__``, where
  Python ignores it and the run would go on); a second Ctrl-C raises
  ``KeyboardInterrupt`` at once. ``leave_sigterm``: SIGTERM is left to JAX's preemption
  notifier (a multi-host run, see :class:`PreemptionAgreement`)."""
  received, interrupted = [], []
  if threading.current_thread() is not threading.main_thread():
    yield received, interrupted
    return

  def on_sigint(signum, frame):
    del frame
    if interrupted:
      raise KeyboardInterrupt
    interrupted.append(signum)

  previous = None if leave_sigterm else signal.signal(
      signal.SIGTERM, lambda signum, frame: received.append(signum))
  previous_int = signal.signal(signal.SIGINT, on_sigint)
  try:
    yield received, interrupted
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)


class PreemptionAgreement:
  """Where the hosts of a multi-host run stop after a SIGTERM: the same step on all.

  A preempted VM sends SIGTERM to its host only. JAX's preemption service (on with
  ``jax.distributed.initialize``) catches it, tells every host, and agrees on a sync
  point beyond the last step any host has reported; every host asks at every dispatch
  (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`, with the
  dispatch's index, which all hosts share) and all of them save at that dispatch. On one
  host, or without the service, ``active`` is False and each host sees its own SIGTERM.
  """

  def __init__(self):
    self.active, self.index = False, 0
    if jax.process_count() < 2:
      return
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    self._reached = multihost_utils.reached_preemption_sync_point
    try:
      self._reached(0)  # dispatch 0: before the first
      self.active = True
    except RuntimeError:  # jax_enable_preemption_service is off
      pass

  def __call__(self) -> bool:
    """After a dispatch: whether every host stops here."""
    if not self.active:
      return False
    self.index += 1
    return bool(self._reached(self.index))
