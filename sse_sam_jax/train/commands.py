"""The commands that read a checkpoint: ``sse-sam-jax eval`` and ``sse-sam-jax hessian``,
and the head/tail Hessian probe the training loop runs."""

from __future__ import annotations

import functools

import numpy as np

from sse_sam_jax import data as data_lib
from sse_sam_jax.train import evaluate as eval_lib
from sse_sam_jax.train import resume, setup


def hessian_subset(split: data_lib.Split, max_examples: int, seed: int) -> data_lib.Split:
  if len(split) <= max_examples:
    return split
  return split.subset(np.sort(np.random.default_rng(seed).permutation(len(split))[:max_examples]))


def head_tail_extremes(run: setup.Run, state, split: data_lib.Split, eta: float, iters: int,
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


def _in_precision(fn):
  """Runs ``fn(c, ...)`` in the run's precision (:func:`sse_sam_jax.train.setup.precision`)."""
  @functools.wraps(fn)
  def wrapped(c, *args, **kwargs):
    with setup.precision(c):
      return fn(c, *args, **kwargs)
  return wrapped


@_in_precision
def hessian_of_checkpoint(c, workdir, *, groups: str = 'head_tail', split: str = 'train',
                          lanczos_iters: int = 40, trace_probes: int = 20, slq_probes: int = 2,
                          max_examples: int = 4096, seed: int = 0,
                          progress: bool = False) -> dict:
  """Per-group spectra of the last checkpoint of ``workdir``; writes JSON and a density plot."""
  from sse_sam_jax import analysis
  from sse_sam_jax.analysis import spectra as spectra_lib
  run, state, _ = resume.restore_model(c, workdir, 'last')
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
  lines = ['| group | examples | lambda_min | lambda_max | trace |',
           '| --- | --- | --- | --- | --- |']
  for g, r in result.items():
    lines.append(f"| {g} | {r['examples']} | {r['lambda_min']:.4g} | {r['lambda_max']:.4g} | "
                 f"{r['trace']:.4g} +- {r['trace_se']:.2g} |")
  return {'spectra': result, 'table': '\n'.join(lines), 'path': str(path)}


@_in_precision
def evaluate_checkpoint(c, workdir, which: str = 'best') -> dict:
  """Evaluates the best (else the last) checkpoint of ``workdir`` on val and test
  (any optimizer's or scope's checkpoint of this config's model, see :func:`restore_model`)."""
  run, state, meta = resume.restore_model(c, workdir, which)
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
