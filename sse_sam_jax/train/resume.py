"""Resume and checkpoint guards: which checkpoint a run may continue from, and what it reads.

A checkpoint records the model's signature and the perturbation layout; a resume
that would change either is refused (a real mismatch), while a checkpoint that does
not read back whole is damaged: set aside, and the next older one tried
(:func:`restore_newest_intact`). :func:`restore_model` reads the model alone, for
the commands that evaluate or analyse a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import jax
import jax.numpy as jnp

from sse_sam_jax.train import checkpointing, setup
from sse_sam_jax.train import workdir as workdir_lib
from sse_sam_jax.train.checkpointing import Checkpoints
from sse_sam_jax.train.workdir import UserError

logger = logging.getLogger(__name__)


def model_signature(state) -> str:
  """A digest of the names, shapes and dtypes of the parameters and BatchNorm statistics."""
  leaves = jax.tree_util.tree_flatten_with_path((state.params, state.batch_stats))[0]
  text = ';'.join(f'{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}' for path, x in leaves)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def check_resume_layout(saved: dict, c, n_dev: int) -> None:
  """Refuses a resume that would silently change which examples a perturbation sees.

  Global perturbations and fixed microbatches do not depend on the device
  count, so such runs resume on any mesh (Orbax reshards the state). Per-device
  perturbations perturb from ``batch / devices`` examples: resuming on another
  device count would change that ``m``.
  """
  if 'devices' not in saved:  # checkpoints from before the layout was recorded
    return
  now, batch_size = setup.scope_plan(c).layout(c, n_dev), c.data.batch_size
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
      if not bool(_all_finite(state.params)):  # on device: sharded multi-host state too
        raise ValueError('non-finite parameters')
    except Exception as e:  # pylint: disable=broad-except
      _damaged(checkpoints, step, e)
      continue
    return state, data_state, meta
  return None


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _damaged(checkpoints, step: int, error: Exception) -> None:
  if jax.process_index() != 0:  # multi-host: the first host moves it, the others skip it
    logger.warning('checkpoint step %d is damaged; skipping it.', step)
    return
  target = checkpoints.set_aside(step)
  reason = re.sub(r'<[^<>]*>', '...', ' '.join(f'{type(error).__name__}: {error}'.split()))[:160]
  logger.warning('checkpoint step %d is damaged (%s); moved to %s, trying an older one.',
                 step, reason, target)


def checkpoint_steps(workdir) -> list[int]:
  """The steps of ``workdir``'s checkpoints; reads the folder only (creates nothing)."""
  folder = checkpointing.step_directory(workdir)
  return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


def has_checkpoint(workdir) -> bool:
  return bool(checkpoint_steps(workdir))


def finished_result(workdir) -> dict | None:
  """The saved results of a finished run in ``workdir`` (its config was checked), or ``None``."""
  path, steps = workdir_lib.as_path(workdir) / 'results.json', checkpoint_steps(workdir)
  if not path.exists() or not steps:
    return None
  result = json.loads(path.read_text())
  if result.get('total_steps') != max(steps):
    return None
  return dict(result, already_finished=True)


def restore_model(c, workdir, which: str = 'last', step: int | None = None):
  """``(run, {'step', 'params', 'batch_stats'}, meta)`` of the ``which`` checkpoint
  ('last', or 'best' falling back to 'last'; ``step``: that kept checkpoint of
  'last'), for evaluation and analysis. Only the
  model is read, so a checkpoint of any optimizer, perturbation scope or mesh fits a
  config with the same model; another model (by the signature saved with the
  checkpoint) is a ``ValueError``."""
  if not has_checkpoint(workdir):  # before anything is built or written
    raise UserError(f'no checkpoint in {checkpointing.step_directory(workdir)}; '
                    f'train first: sse-sam-jax train --workdir {workdir}')
  run = setup.prepare(c)
  checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep)
  if which == 'best' and checkpoints.best_step() is None:
    which = 'last'
  if step is not None and (which != 'last' or step not in checkpoints.steps()):
    checkpoints.close()
    raise UserError(f'no checkpoint of step {step} in {workdir}; kept: {checkpoints.steps()}.')
  meta = checkpoints.meta(which, step)
  saved, ours = meta.get('model_signature'), model_signature(run.state)
  if saved is not None and saved != ours:
    checkpoints.close()
    raise ValueError(f'the checkpoint does not fit model {c.model.name!r} on {c.data.name!r} '
                     f'(model signature {saved}, this config\'s {ours}); was it written by '
                     'another config?')
  state = checkpoints.restore_model(run.state, which, step)
  checkpoints.close()
  return run, state, dict(meta, checkpoint=which)
