"""Orbax checkpoints: train state + data-iterator state + metadata; last N and best.

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact. A
checkpoint damaged afterwards (truncated or deleted files, random bytes, a
missing item) is found when it is read: :meth:`Checkpoints.set_aside` moves it
to ``checkpoints/damaged/`` (never deletes it) so that the next older one can
be restored.
"""

from __future__ import annotations

import datetime

import jax
import orbax.checkpoint as ocp
from etils import epath

from sse_sam_jax.train import workdir as workdir_lib


class Checkpoints:
  """``last/`` keeps the newest ``keep`` checkpoints; ``best/`` the best by a metric."""

  def __init__(self, workdir, keep: int = 2):
    workdir = workdir_lib.as_path(workdir)
    if workdir_lib.is_local(workdir):
      workdir = workdir.absolute()
    self.root = root = workdir / 'checkpoints'
    self.last = ocp.CheckpointManager(
        root / 'last', options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=('state', 'data', 'meta'))
    self.best = ocp.CheckpointManager(
        root / 'best', options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m['score'], best_mode='max'),
        item_names=('state', 'data', 'meta'))

  @staticmethod
  def _args(state, data_state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))

  def save(self, step: int, state, data_state: dict, meta: dict, score: float | None = None):
    self.last.save(step, args=self._args(state, data_state, meta), force=True)
    if score is not None:
      self.best.save(step, args=self._args(state, data_state, meta),
                     metrics={'score': float(score)}, force=True)

  def latest_step(self):
    return self.last.latest_step()

  def steps(self) -> list[int]:
    """The steps of ``last/``, newest first."""
    return sorted(self.last.all_steps(), reverse=True)

  def set_aside(self, step: int) -> epath.Path:
    """Moves checkpoint ``step`` (of ``last/`` and ``best/``) to ``damaged/``."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = self.root / 'damaged' / f'{step}-{stamp}'
    target.mkdir(parents=True, exist_ok=True)
    for name in ('last', 'best'):
      folder = self.root / name / str(step)
      if folder.exists():
        workdir_lib.move(folder, target / name)
    self.last.reload()
    self.best.reload()
    return target

  def _newest(self, which: str, step: int | None = None):
    """The manager of ``which`` ('last' or 'best') and its checkpoint's step."""
    if which == 'last':
      return self.last, self.last.latest_step() if step is None else step
    return self.best, self.best.best_step()

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
    'batch_stats'}``; ``step`` picks one of ``last``'s kept checkpoints."""
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
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.last.close()
    self.best.close()
