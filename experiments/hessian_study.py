"""Head/tail Hessian spectra through training, for the study's methods and controls.

  python experiments/hessian_study.py run [--seeds 0 1 2] [--iters 80]
  python experiments/hessian_study.py check       # seed 0, last checkpoint: 96 steps
  python experiments/hessian_study.py report      # hessian_B.csv + figures from the JSONs

For every method at its reference radius (``study.METHODS``; the reweighting controls
included) and seed, every kept checkpoint (epochs 10, 20, 30, 40) is read and, per group,
the extreme eigenvalues of the Hessian of the group's **mean cross-entropy** are found by
Lanczos with full reorthogonalisation: the same function for every method, so a method's
reweighted training loss does not rescale its own curvature. Groups, drawn once (the same
examples for every run): tail = 768 of the 1,536 training examples of the classes with
fewer than eta examples; head = 512 of the others. BatchNorm in evaluation mode.

Convergence: the Ritz values of the leading ``iters/2`` Lanczos steps are compared with
those of all ``iters`` steps (the tridiagonal's leading block is the shorter run), and
``check`` reruns seed 0's last checkpoint of every run with 96 steps: the report shows
how far the sweep's extremes are from those. Seed 0's last checkpoint also gets a
stochastic Lanczos quadrature density (2 probes). Results:
``runs/B/<run>/seed<k>/hessian_step<step>.json`` (a finished one is skipped: the sweep
resumes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from study import METHODS, RESULTS, RUNS_DIR, config_for, write_csv  # pylint: disable=wrong-import-position

SETTING = 'B'
HEAD_EXAMPLES = 512
TAIL_EXAMPLES = 768
RUNS = tuple(METHODS)  # reference radii: the run name is the method's


def _groups(run_data, stats, eta):
  """Per-group example weights over the training split: the group's mean."""
  labels = run_data.train.label
  tail_classes = stats.tail_classes(eta)
  is_tail = tail_classes[labels]
  rng = np.random.default_rng(0)
  out = {}
  for name, members, size in (('head', ~is_tail, HEAD_EXAMPLES), ('tail', is_tail, TAIL_EXAMPLES)):
    mask = np.zeros(len(labels), bool)
    mask[rng.permutation(np.flatnonzero(members))[:size]] = True
    out[name] = mask / mask.sum()
  return out


def spectra_of(run_name: str, seed: int, step: int, iters: int, density: bool) -> dict:
  import jax
  import optax

  from sse_sam_jax import analysis
  from sse_sam_jax.analysis import hessian
  from sse_sam_jax.train import resume
  c = config_for(SETTING, run_name, seed)
  workdir = RUNS_DIR / SETTING / run_name / f'seed{seed}'
  run, state, _ = resume.restore_model(c, workdir, 'last', step)
  loss = analysis.model_loss(run.model, state['batch_stats'],
                             optax.softmax_cross_entropy_with_integer_labels)
  out = {'run': run_name, 'seed': seed, 'step': step, 'iters': iters}
  for name, w in _groups(run.data, run.stats, c.optimizer.eta).items():
    g = hessian.GroupLoss(loss, state['params'], run.data.train.x, run.data.train.label, w, 1024)
    alphas, betas, _ = hessian.lanczos(g.hvp, g.dim, iters, jax.random.key(seed))
    half = len(alphas) // 2
    full, _ = hessian.tridiagonal_eig(alphas, betas)
    short, _ = hessian.tridiagonal_eig(alphas[:half], betas[:half - 1])
    out[name] = {'examples': int((w != 0).sum()), 'lambda_min': float(full[0]),
                 'lambda_max': float(full[-1]), 'lambda_min_half': float(short[0]),
                 'lambda_max_half': float(short[-1]), 'lanczos_steps': len(alphas)}
    # the extremes after every 8 steps: how they settle (the convergence check)
    out[name]['ritz_by_steps'] = {
        k: [float(v) for v in hessian.tridiagonal_eig(alphas[:k], betas[:k - 1])[0][[0, -1]]]
        for k in range(8, len(alphas) + 1, 8)}
    if density:
      grid, dens, nodes, weights = hessian.slq_density(g.hvp, g.dim, iters, 2, seed)
      out[name]['density'] = {'grid': grid.tolist(), 'density': dens.tolist(),
                              'nodes': nodes.tolist(), 'weights': weights.tolist()}
  return out


def check(iters: int = 96) -> None:
  """Seed 0's last checkpoint of every run with ``iters`` Lanczos steps: how far the
  extremes after the sweep's steps are from those after ``iters``."""
  from sse_sam_jax.train.checkpointing import Checkpoints
  for name in RUNS:
    workdir = RUNS_DIR / SETTING / name / 'seed0'
    path = workdir / f'hessian_check{iters}.json'
    if path.exists() or not (workdir / 'results.json').exists():
      continue
    checkpoints = Checkpoints(workdir, keep=4)
    step = max(checkpoints.steps())
    checkpoints.close()
    result = spectra_of(name, 0, step, iters, density=False)
    path.write_text(json.dumps(result))
    print(f"{name}: check at {iters} steps done", flush=True)


def run(seeds, iters: int) -> None:
  from sse_sam_jax.train.checkpointing import Checkpoints
  for seed in seeds:
    for name in RUNS:
      workdir = RUNS_DIR / SETTING / name / f'seed{seed}'
      if not (workdir / 'results.json').exists():
        print(f'{name} seed {seed}: not trained yet (experiments/study.py run)', flush=True)
        continue
      checkpoints = Checkpoints(workdir, keep=4)
      steps = sorted(checkpoints.steps())
      checkpoints.close()
      for step in steps:
        path = workdir / f'hessian_step{step}.json'
        if path.exists():
          continue
        t0 = time.perf_counter()
        result = spectra_of(name, seed, step, iters, density=step == steps[-1] and seed == 0)
        result['seconds'] = time.perf_counter() - t0
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
        print(f"{name} seed {seed} step {step}: head [{result['head']['lambda_min']:.4g}, "
              f"{result['head']['lambda_max']:.4g}] tail [{result['tail']['lambda_min']:.4g}, "
              f"{result['tail']['lambda_max']:.4g}] ({result['seconds']:.0f}s)", flush=True)


FIELDS = ('run', 'seed', 'step', 'epoch', 'group', 'examples', 'lambda_min', 'lambda_max',
          'ratio', 'lambda_min_half', 'lambda_max_half', 'lanczos_steps', 'seconds')


def collect() -> list[dict]:
  rows = []
  for name in RUNS:
    for path in sorted((RUNS_DIR / SETTING / name).glob('seed*/hessian_step*.json')):
      r = json.loads(path.read_text())
      for group in ('head', 'tail'):
        g = r[group]
        rows.append(dict(run=name, seed=r['seed'], step=r['step'], epoch=round(r['step'] / 97),
                         group=group, examples=g['examples'], lambda_min=g['lambda_min'],
                         lambda_max=g['lambda_max'], ratio=g['lambda_min'] / g['lambda_max'],
                         lambda_min_half=g['lambda_min_half'],
                         lambda_max_half=g['lambda_max_half'], lanczos_steps=g['lanczos_steps'],
                         seconds=r.get('seconds', 0.0) if group == 'head' else 0.0))
  return rows


def collect_checks() -> list[dict]:
  """One row per run, group and step count of the 96-step check."""
  rows = []
  for name in RUNS:
    path = RUNS_DIR / SETTING / name / 'seed0' / 'hessian_check96.json'
    if not path.exists():
      continue
    r = json.loads(path.read_text())
    for group in ('head', 'tail'):
      for k, (lo, hi) in r[group]['ritz_by_steps'].items():
        rows.append(dict(run=name, group=group, lanczos_steps=int(k), lambda_min=lo,
                         lambda_max=hi))
  return rows


def plots(rows) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
  for i, group in enumerate(('head', 'tail')):
    for j, key in enumerate(('lambda_min', 'lambda_max', 'ratio')):
      ax = axes[i, j]
      for name in RUNS:
        mine = [r for r in rows if r['run'] == name and r['group'] == group]
        epochs = sorted({r['epoch'] for r in mine})
        if not epochs:
          continue
        mean = [np.mean([r[key] for r in mine if r['epoch'] == e]) for e in epochs]
        sd = [np.std([r[key] for r in mine if r['epoch'] == e]) for e in epochs]
        ax.errorbar(epochs, mean, yerr=sd, marker='o', capsize=2, label=name,
                    linestyle='--' if name.endswith('_gn') else '-')
      ax.set_title(f'{group}: {key.replace("ratio", "lambda_min / lambda_max")}')
      ax.grid(alpha=0.3)
      if key == 'lambda_max':
        ax.set_yscale('log')
      if i == 1:
        ax.set_xlabel('epoch')
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(RESULTS / 'hessian_B.png', dpi=110)
  plt.close(fig)
  # densities at the last checkpoint, seed 0
  fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
  for ax, group in zip(axes, ('head', 'tail')):
    for name in RUNS:
      paths = sorted((RUNS_DIR / SETTING / name / 'seed0').glob('hessian_step*.json'),
                     key=lambda p: int(p.stem.split('step')[1]))
      if not paths:
        continue
      d = json.loads(paths[-1].read_text())[group].get('density')
      if d:
        ax.plot(d['grid'], np.maximum(d['density'], 1e-12), label=name,
                linestyle='--' if name.endswith('_gn') else '-')
    ax.set_xscale('symlog', linthresh=1e-2)
    ax.set_yscale('log')
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel('eigenvalue')
    ax.set_title(f'{group}: spectral density at epoch 40 (seed 0, SLQ)')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(RESULTS / 'hessian_density_B.png', dpi=110)
  plt.close(fig)


def report() -> None:
  rows = collect()
  if rows:  # fresh JSONs on disk: rewrite the CSV from them
    write_csv(RESULTS / 'hessian_B.csv', rows, FIELDS)
    plots(rows)
  checks = collect_checks()
  if checks:
    write_csv(RESULTS / 'hessian_check_B.csv', checks)
  print(f'{len(rows)} rows, {len(checks)} check rows')


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('command', choices=('run', 'check', 'report'))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--iters', type=int, default=32)
  args = parser.parse_args(argv)
  if args.command == 'run':
    run(args.seeds, args.iters)
  elif args.command == 'check':
    check()
  report()


if __name__ == '__main__':
  main()
