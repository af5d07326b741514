"""The reproduction study on the offline long-tailed benchmark: run, resume, report.

  python experiments/study.py run --seeds 0 1 2 [--setting B] [--only sgd sse_sam]
  python experiments/report.py

Every run is a training of ``sse_sam_jax.train.trainer`` with the offline
benchmark's config plus the overrides below; each writes
``experiments/results/runs/<setting>/<run>/seed<k>/results.json`` and is skipped
when that file exists (so an interrupted sweep resumes where it stopped). The
report reads every results.json and writes ``experiments/results/REPORT.md``
and its figures.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'
RUNS_DIR = RESULTS / 'runs'

SETTINGS = {'B': {'data.iid_noise_scale': 0.07}, 'A': {'data.iid_noise_scale': 0.02}}

# name -> (description, overrides). Radii are the references' (not tuned here).
RUNS = {
    'sgd': ('SGD', {'optimizer.name': 'sgd'}),
    'sam': ('SAM rho 0.05', {'optimizer.name': 'sam', 'optimizer.rho': 0.05}),
    'imbsam_group': ('ImbSAM rho 0.1, group-normalised (SSE-SAM repo baseline)',
                     {'optimizer.name': 'imbsam', 'optimizer.tail_rho': 0.1,
                      'optimizer.normalization': 'group'}),
    'control_group': ('SGD on the group-normalised loss (= ImbSAM rho 0; reweighting control)',
                      {'optimizer.name': 'imbsam', 'optimizer.tail_rho': 0.0,
                       'optimizer.normalization': 'group'}),
    'imbsam_batch': ('ImbSAM rho 0.1, batch-normalised (paper rule)',
                     {'optimizer.name': 'imbsam', 'optimizer.tail_rho': 0.1}),
    'sse_sam': ('SSE-SAM 0.05/0.1, gamma 0.7 (batch-normalised, as published)',
                {'optimizer.name': 'sse_sam'}),
    'sse_sam_group': ('SSE-SAM 0.05/0.1, gamma 0.7, group-normalised losses',
                      {'optimizer.name': 'sse_sam', 'optimizer.normalization': 'group'}),
    'drw': ('SGD + DRW (class-balanced weights from epoch 32)',
            {'optimizer.name': 'sgd', 'loss.drw_epoch': 32}),
    'sse_sam_drw': ('SSE-SAM 0.05/0.1 + DRW from epoch 32',
                    {'optimizer.name': 'sse_sam', 'loss.drw_epoch': 32}),
    'sse_sam_g05': ('SSE-SAM 0.05/0.1, gamma 0.5', {'optimizer.name': 'sse_sam',
                                                   'optimizer.gamma': 0.5}),
    'sse_sam_g09': ('SSE-SAM 0.05/0.1, gamma 0.9', {'optimizer.name': 'sse_sam',
                                                   'optimizer.gamma': 0.9}),
    'ldam_drw': ('SGD + LDAM-DRW (normalised classifier, DRW from epoch 32)',
                 {'optimizer.name': 'sgd', 'loss.name': 'ldam', 'loss.drw_epoch': 32,
                  'model.normed_classifier': True}),
    'sse_sam_ldam_drw': ('SSE-SAM 0.05/0.1 + LDAM-DRW',
                         {'optimizer.name': 'sse_sam', 'loss.name': 'ldam', 'loss.drw_epoch': 32,
                          'model.normed_classifier': True}),
}
# The SAM variants of issue 16, each against exact SSE-SAM ('sse_sam') with the same seeds.
VARIANT_RUNS = {
    'sse_sam_looksam2': ('SSE-SAM, perturbed passes every 2nd step, LookSAM reuse (alpha 0.7)',
                         {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 2}),
    'sse_sam_looksam5': ('SSE-SAM, perturbed passes every 5th step, LookSAM reuse (alpha 0.7)',
                         {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 5}),
    'sse_sam_fraction05': ('SSE-SAM, perturbed passes on a random half of the steps, reuse',
                           {'optimizer.name': 'sse_sam', 'optimizer.sharpness_fraction': 0.5}),
    'sse_sam_reuse2m': ('SSE-SAM, perturbed passes every 2nd step, reuse at the measured scale',
                        {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 2,
                         'optimizer.sharpness_scale': 'measured', 'optimizer.sharpness_alpha': 1.0}),
    'sse_sam_reuse5m': ('SSE-SAM, perturbed passes every 5th step, reuse at the measured scale',
                        {'optimizer.name': 'sse_sam', 'optimizer.sharpness_every': 5,
                         'optimizer.sharpness_scale': 'measured', 'optimizer.sharpness_alpha': 1.0}),
    'asam_sse_sam': ('SSE-SAM with ASAM ascent steps (eta 0.01), radii 0.5/1.0 (10x, as ASAM)',
                     {'optimizer.name': 'sse_sam', 'optimizer.adaptive': True,
                      'optimizer.head_rho': 0.5, 'optimizer.tail_rho': 1.0}),
    'focal_sam': ('Focal-SAM rho 0.05, lambda 1, gamma 1 (one perturbed pass)',
                  {'optimizer.name': 'focal_sam', 'optimizer.rho': 0.05}),
    'shot_sam': ('Per-shot radii 0.05/0.075/0.1 (Many/Medium/Few; 3 perturbed passes)',
                 {'optimizer.name': 'shot_sam'}),
    'sse_sam_bn_last': ('SSE-SAM, BatchNorm running statistics from the last perturbed pass',
                        {'optimizer.name': 'sse_sam', 'model.running_stats': 'last_perturbed'}),
}
RUNS.update(VARIANT_RUNS)
# Radius grids, trained with 10% of every class held out for validation; the radius is
# chosen by mean validation accuracy (All) over seeds, never on the test set.
GRIDS = {
    'SAM rho': {f'sam_val_r{r}': r for r in (0.02, 0.05, 0.1)},
    'SSE-SAM rho_tail (rho_head 0.05)': {f'sse_sam_val_rt{r}': r for r in (0.02, 0.05, 0.1)},
}
for _r in (0.02, 0.05, 0.1):
  RUNS[f'sam_val_r{_r}'] = (f'SAM rho {_r} (val split held out)',
                            {'optimizer.name': 'sam', 'optimizer.rho': _r,
                             'data.val_fraction': 0.1})
  RUNS[f'sse_sam_val_rt{_r}'] = (f'SSE-SAM rho_tail {_r} (val split held out)',
                                 {'optimizer.name': 'sse_sam', 'optimizer.tail_rho': _r,
                                  'data.val_fraction': 0.1})
RUNS['sgd_val'] = ('SGD (val split held out)', {'optimizer.name': 'sgd', 'data.val_fraction': 0.1})
HESSIAN_RUNS = ('sgd', 'sam', 'imbsam_group', 'sse_sam', 'sse_sam_group')


def config_for(setting: str, run: str, seed: int, hessian: bool):
  from sse_sam_jax.train.config import default_config
  c = default_config()
  c.seed = seed
  c.eval.every_epochs = 40
  c.checkpoint.every_epochs = 10
  c.checkpoint.keep = 1
  for key, value in {**SETTINGS[setting], **RUNS[run][1]}.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  if hessian:
    c.hessian.update(every_epochs=5, max_examples=1024, lanczos_iters=12)
  return c


def run_all(setting: str, seeds, only=None):
  from sse_sam_jax.train import trainer
  names = only or list(RUNS)
  for seed in seeds:
    for name in names:
      workdir = RUNS_DIR / setting / name / f'seed{seed}'
      if (workdir / 'results.json').exists():
        continue
      hessian = seed == 0 and name in HESSIAN_RUNS
      t0 = time.perf_counter()
      result = trainer.train(config_for(setting, name, seed, hessian), workdir, progress=False)
      m = result['test']
      print(f"{setting} {name} seed {seed}: All {100 * m['all']:.2f} Few {100 * m['few']:.2f} "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)


def load(setting: str):
  out = {}
  for name in RUNS:
    for path in sorted((RUNS_DIR / setting / name).glob('seed*/results.json')):
      r = json.loads(path.read_text())
      out.setdefault(name, {})[int(path.parent.name[4:])] = r
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('command', choices=('run',), help='the report: experiments/report.py')
  parser.add_argument('--setting', default='B', choices=tuple(SETTINGS))
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--only', nargs='+', default=None, choices=tuple(RUNS))
  args = parser.parse_args(argv)
  run_all(args.setting, args.seeds, args.only)


if __name__ == '__main__':
  main()
