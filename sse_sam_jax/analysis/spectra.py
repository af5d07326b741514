"""Per-group Hessian spectra of a trained model: lambda_min/max, trace, density, plots."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from sse_sam_jax.analysis import hessian
from sse_sam_jax.data import ClassStats, Split


def model_loss(model, batch_stats, per_example_loss):
  """``(params, x, y) -> [B]`` with BatchNorm in evaluation mode."""
  def loss(params, x, y):
    logits, _ = model.apply(params, batch_stats, x, train=False)
    return per_example_loss(logits, y)
  return loss


def groups_for(stats: ClassStats, kind: str, eta: float | None = None) -> dict[str, np.ndarray]:
  """Class masks: ``'head_tail'`` (needs ``eta``), ``'shots'`` (Many/Medium/Few), ``'class'``."""
  if kind == 'head_tail':
    if eta is None:
      raise ValueError("groups 'head_tail' need eta (classes with fewer examples are tail).")
    tail = stats.tail_classes(eta)
    return {'head': ~tail, 'tail': tail}
  if kind == 'shots':
    return {k: v for k, v in stats.shot_groups().items() if v.any()}
  if kind == 'class':
    return {f'class_{c}': np.arange(stats.num_classes) == c for c in range(stats.num_classes)}
  raise ValueError(f"group kind must be 'head_tail', 'shots' or 'class', got {kind!r}.")


def group_spectra(loss, params, split: Split, groups: dict, *, normalization='batch',
                  lanczos_iters=40, slq_probes=2, trace_probes=20, seed=0, batch_size=512,
                  density=True, dtype=None, progress: bool = False) -> dict:
  """For every group: lambda_min, lambda_max, Hutchinson trace (+- s.e.) and SLQ density.

  ``progress`` shows a bar per group counting Hessian-vector products (each is a
  forward-over-reverse pass over the group's examples).
  """
  out = {}
  for name, classes in groups.items():
    w = hessian.example_weights(split.label, classes, split.num_classes, normalization)
    g = hessian.GroupLoss(loss, params, split.x, split.label, w, batch_size)
    dt = dtype or g.flat_params.dtype
    hvp: Callable[[jax.Array], jax.Array] = g.hvp
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      total = lanczos_iters * (1 + (slq_probes if density else 0)) + trace_probes
      bar = tqdm(total=total, desc=f'hessian {name} ({int((w != 0).sum())} examples)',
                 unit='hvp', leave=False)

      def counted_hvp(v, _hvp=g.hvp, _bar=bar):
        _bar.update(1)
        return _hvp(v)
      hvp = counted_hvp
    lo, hi = hessian.extreme_eigenvalues(hvp, g.dim, lanczos_iters, seed, dt)
    result = {'lambda_min': lo, 'lambda_max': hi, 'examples': int((w != 0).sum())}
    if trace_probes:
      result['trace'], result['trace_se'] = hessian.hutchinson_trace(hvp, g.dim, trace_probes,
                                                                     seed, dt)
    if density:
      grid, dens, nodes, weights = hessian.slq_density(hvp, g.dim, lanczos_iters, slq_probes,
                                                       seed, dtype=dt)
      result['density'] = {'grid': grid.tolist(), 'density': dens.tolist(),
                           'nodes': nodes.tolist(), 'weights': weights.tolist()}
    out[name] = result
    if bar is not None:
      bar.close()
  return out


def plot_densities(spectra: dict, path, title=''):
  """Log density against a symmetric-log eigenvalue axis, one curve per group."""
  # A Figure of its own, not pyplot's: no backend is switched and no global figure is left
  # behind in the caller's process (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 3.8))
  ax = fig.add_subplot()
  for name, r in spectra.items():
    if 'density' in r:
      d = r['density']
      ax.plot(d['grid'], np.maximum(d['density'], 1e-12), label=name)
  ax.set_xscale('symlog', linthresh=1e-2)
  ax.set_yscale('log')
  ax.set_ylim(bottom=1e-8)
  ax.set_xlabel('eigenvalue')
  ax.set_ylabel('density')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write(spectra: dict, workdir, stem='hessian'):
  workdir = pathlib.Path(workdir)
  (workdir / f'{stem}.json').write_text(json.dumps(spectra, indent=1))
  plot_densities(spectra, workdir / f'{stem}_density.png')
  return workdir / f'{stem}.json'
