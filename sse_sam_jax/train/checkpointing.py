"""Orbax checkpoints: train state + data-iterator state + metadata, in one
``CheckpointManager`` whose preservation policy keeps the newest ``keep`` and the best.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact. A checkpoint damaged
afterwards (truncated or deleted files, random bytes, a missing item) is found when it
is read: :meth:`Checkpoints.set_aside` moves it to ``checkpoints/damaged/`` (never
deletes it) so that the next older one can be restored.

Layout: ``checkpoints/steps/<step>``. A workdir written before (``checkpoints/last/``
and ``checkpoints/best/``, one manager each) is read and continued as it is: its
``last/`` is the managed folder and its ``best/`` is still read for the best model.
"""

from __future__ import annotations

import datetime
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath

from sse_sam_jax.train import workdir as workdir_lib

ITEMS = ('state', 'data', 'meta')


class _UnscoredSaveNotice(logging.Filter):
  """Drops Orbax's warning about a save without metrics while the best is tracked:
  checkpoints between evaluations have no score, by design (LatestN keeps them)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Requested `tracked_metric`; did not provide')


logging.getLogger('absl').addFilter(_UnscoredSaveNotice())


def _score(metrics) -> float:
  return metrics['score']


def step_directory(workdir) -> epath.Path:
  """Where ``workdir``'s checkpoints are: ``checkpoints/steps``, or the ``last/`` of a
  workdir written by the earlier two-manager layout. Reads the folder only."""
  root = workdir_lib.as_path(workdir) / 'checkpoints'
  if not (root / 'steps').exists() and (root / 'last').exists():
    return root / 'last'
  return root / 'steps'


class Checkpoints:
  """The newest ``keep`` checkpoints and, with ``track_best``, the best one by its
  ``score`` (the model-selection metric, when a save has one), all in one folder.
  ``track_best=False`` (a run that selects no model) keeps the newest only."""

  def __init__(self, workdir, keep: int = 2, track_best: bool = True):
    workdir = workdir_lib.as_path(workdir)
    if workdir_lib.is_local(workdir):
      workdir = workdir.absolute()
    self.root = workdir / 'checkpoints'
    self.directory = step_directory(workdir)
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if track_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=_score, reverse=False, n=1, keep_checkpoints_without_metrics=False))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            create=True, best_fn=_score if track_best else None, best_mode='max',
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)),
        item_names=ITEMS)
    self.track_best = track_best
    legacy_best = self.root / 'best'
    self.legacy_best = None
    if self.directory.name == 'last' and legacy_best.exists():
      self.legacy_best = ocp.CheckpointManager(
          legacy_best, options=ocp.CheckpointManagerOptions(
              read_only=True, best_fn=_score, best_mode='max'), item_names=ITEMS)

  @staticmethod
  def _args(state, data_state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))

  def save(self, step: int, state, data_state: dict, meta: dict, score: float | None = None):
    metrics = None if score is None else {'score': float(score)}
    self.manager.save(step, args=self._args(state, data_state, meta), metrics=metrics,
                      force=True)

  def latest_step(self):
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """The kept steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def best_step(self) -> int | None:
    """The step of the best checkpoint (``None`` when no save had a score)."""
    # (without best_fn Orbax's best_step is the latest: not a best)
    best = self.manager.best_step() if self.track_best else None  # None: nothing scored
    if best is None and self.legacy_best is not None:
      best = self.legacy_best.best_step()
    return best

  def set_aside(self, step: int) -> epath.Path:
    """Moves checkpoint ``step`` (and an earlier layout's best copy of it) to
    ``damaged/``."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = self.root / 'damaged' / f'{step}-{stamp}'
    target.mkdir(parents=True, exist_ok=True)
    for folder, name in ((self.directory, 'kept'), (self.root / 'best', 'best')):
      if (folder / str(step)).exists():
        workdir_lib.move(folder / str(step), target / name)
    self.manager.reload()
    if self.legacy_best is not None:
      self.legacy_best.reload()
    return target

  def _newest(self, which: str, step: int | None = None):
    """The manager holding ``which`` ('last' or 'best') and its checkpoint's step."""
    if which == 'last':
      return self.manager, self.manager.latest_step() if step is None else step
    best = self.best_step()
    if best is not None and best in self.manager.all_steps():
      return self.manager, best
    return self.legacy_best, best

  def restore(self, abstract_state, which='last', step: int | None = None):
    """The full state, the data-iterator state and the metadata, placed like
    ``abstract_state``."""
    manager, step = self._newest(which, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], restored['meta']

  def restore_model(self, state, which='last', step: int | None = None) -> dict:
    """The step, parameters and BatchNorm statistics alone, placed like ``state``'s;
    the optimizer state is not read, so the checkpoint of any optimizer or
    perturbation scope with the same model fits. Returns ``{'step', 'params',
    'batch_stats'}``; ``step`` picks one of the kept checkpoints."""
    manager, step = self._newest(which, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {
        'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats})
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))['state']

  def meta(self, which='last', step: int | None = None) -> dict:
    """The metadata alone (read before the state, to check it)."""
    manager, step = self._newest(which, step)
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
    if self.legacy_best is not None:
      self.legacy_best.close()
