"""Writes experiments/results/REPORT.md from the study's results.json files."""

from __future__ import annotations

import json

import numpy as np

from study import GRIDS, RESULTS, RUNS, RUNS_DIR, SETTINGS, load

GROUPS = ('many', 'medium', 'few', 'all')


def _fmt(values):
  v = 100 * np.asarray(values)
  return f'{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}'


def table(results, setting) -> list[str]:
  lines = ['| method | seeds | Many | Medium | Few | All | final train acc |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name, per_seed in results.items():
    seeds = sorted(per_seed)
    cells = [_fmt([per_seed[s]['test'][g] for s in seeds]) for g in GROUPS]
    lines.append(f'| {RUNS[name][0]} | {len(seeds)} | ' + ' | '.join(cells) +
                 f' | {_train_acc(setting, name, seeds)} |')
  return lines


def _train_acc(setting, name, seeds) -> str:
  """Training accuracy over the last logged steps (augmentation-free, running weights)."""
  accs = []
  for s in seeds:
    path = RUNS_DIR / setting / name / f'seed{s}' / 'metrics.jsonl'
    recs = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    last = [r['train_accuracy'] for r in recs if 'train_accuracy' in r]
    if last:
      accs.append(last[-1])
  return _fmt(accs) if accs else 'n/a'


def paired(results, base='sgd') -> list[str]:
  lines = ['| method − SGD (same seed) | seeds | Δ All (mean ± std) | Δ Few (mean ± std) | '
           'seeds better on Few |', '| --- | --- | --- | --- | --- |']
  if base not in results:
    return []
  for name, per_seed in results.items():
    if name == base:
      continue
    seeds = sorted(set(per_seed) & set(results[base]))
    if not seeds:
      continue
    d_all = [per_seed[s]['test']['all'] - results[base][s]['test']['all'] for s in seeds]
    d_few = [per_seed[s]['test']['few'] - results[base][s]['test']['few'] for s in seeds]
    better = sum(d > 0 for d in d_few)
    lines.append(f'| {RUNS[name][0]} | {len(seeds)} | {_fmt(d_all)} | {_fmt(d_few)} | '
                 f'{better}/{len(seeds)} |')
  return lines


def paired_pair(results, a, b) -> str:
  if a not in results or b not in results:
    return ''
  seeds = sorted(set(results[a]) & set(results[b]))
  d_all = [results[a][s]['test']['all'] - results[b][s]['test']['all'] for s in seeds]
  d_few = [results[a][s]['test']['few'] - results[b][s]['test']['few'] for s in seeds]
  return (f'{RUNS[a][0]} minus {RUNS[b][0]}: All {_fmt(d_all)}, Few {_fmt(d_few)} '
          f'({sum(d > 0 for d in d_few)}/{len(seeds)} seeds better on Few)')


def plot_per_class(results, setting, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name in ('sgd', 'sam', 'imbsam_group', 'control_group', 'sse_sam', 'sse_sam_group'):
    if name not in results:
      continue
    per_seed = results[name]
    counts = np.asarray(next(iter(per_seed.values()))['class_counts'])
    acc = np.mean([r['test']['per_class'] for r in per_seed.values()], axis=0)
    ax.plot(counts, 100 * acc, marker='o', label=name)
  ax.set_xscale('log')
  ax.set_xlabel('training examples of the class')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'setting {setting}: per-class accuracy (mean over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_hessian(setting, path) -> bool:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
  found = False
  for name in ('sgd', 'sam', 'imbsam_group', 'sse_sam', 'sse_sam_group'):
    path_m = RUNS_DIR / setting / name / 'seed0' / 'metrics.jsonl'
    if not path_m.exists():
      continue
    recs = [json.loads(l) for l in path_m.read_text().splitlines()]
    recs = [r for r in recs if 'hessian_tail_lambda_min' in r]
    if not recs:
      continue
    found = True
    epochs = [r['epoch'] for r in recs]
    for ax, key in zip(axes.flat, ('hessian_head_lambda_min', 'hessian_head_lambda_max',
                                   'hessian_tail_lambda_min', 'hessian_tail_lambda_max')):
      ax.plot(epochs, [r[key] for r in recs], marker='.', label=name)
      ax.set_title(key.replace('hessian_', ''))
      ax.set_xlabel('epoch')
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return found


def hessian_final(setting) -> list[str]:
  lines = ['| method (seed 0) | head λ_min | head λ_max | tail λ_min | tail λ_max |',
           '| --- | --- | --- | --- | --- |']
  for name in ('sgd', 'sam', 'imbsam_group', 'sse_sam', 'sse_sam_group'):
    path_m = RUNS_DIR / setting / name / 'seed0' / 'metrics.jsonl'
    if not path_m.exists():
      continue
    recs = [json.loads(l) for l in path_m.read_text().splitlines() if 'hessian' in l]
    if recs:
      r = recs[-1]
      lines.append(f"| {RUNS[name][0]} | {r['hessian_head_lambda_min']:.4f} | "
                   f"{r['hessian_head_lambda_max']:.3f} | {r['hessian_tail_lambda_min']:.4f} | "
                   f"{r['hessian_tail_lambda_max']:.3f} |")
  return lines


def _balanced(metrics) -> float:
  return float(np.nanmean(np.asarray(metrics['per_class'], float)))


def grid_tables(results) -> list[str]:
  lines = []
  for grid_name, members in GRIDS.items():
    present = {n: r for n, r in members.items() if n in results}
    if not present:
      continue
    rows, best, best_val = [], None, -1.0
    for name, radius in present.items():
      per_seed = results[name]
      seeds = sorted(per_seed)
      val = np.mean([_balanced(per_seed[s]['val']) for s in seeds])
      if val > best_val:
        best, best_val = name, val
      rows.append((name, radius, seeds, per_seed))
    lines += [f'**{grid_name}** (10% of every class held out; chosen by the validation '
              'split\'s balanced accuracy, i.e. mean per-class accuracy, because that split '
              'is as long-tailed as the training set while the test set is balanced):', '',
              '| radius | seeds | val balanced acc | test Many | test Few | test All | |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for name, radius, seeds, per_seed in rows:
      mark = 'chosen' if name == best else ''
      lines.append(f"| {radius} | {len(seeds)} | {_fmt([_balanced(per_seed[s]['val']) for s in seeds])} | "
                   f"{_fmt([per_seed[s]['test']['many'] for s in seeds])} | "
                   f"{_fmt([per_seed[s]['test']['few'] for s in seeds])} | "
                   f"{_fmt([per_seed[s]['test']['all'] for s in seeds])} | {mark} |")
    lines.append('')
    if 'sgd_val' in results:
      lines.append('- ' + paired_pair(results, best, 'sgd_val'))
      lines.append('')
  return lines


def compute_seconds(results) -> float:
  return sum(r.get('train_seconds', 0.0) for per_seed in results.values()
             for r in per_seed.values())


def write_report(conclusions: str | None = None):
  out = ['# Reproduction study: the offline long-tailed benchmark (MNIST-1D-LT)', '',
         'Generated by `python experiments/report.py` from the runs of '
         '`python experiments/study.py run --setting B --seeds 0 1 2` (plus `--seeds 3 4` for all '
         'runs except the radius grids) and '
         '`python experiments/study.py run --setting A --seeds 0 1 2 --only sgd sam '
         'imbsam_group control_group sse_sam sse_sam_group` (the compute lines below give the training time per setting; '
         'three of these processes ran side by side on 2 CPU cores). Test accuracy of the final model (no selection), in %, mean ± std '
         'over training seeds; Many > 1000, Medium 200–1000, Few < 200 training examples.', '']
  notes = RESULTS / 'CONCLUSIONS.md'
  for setting in SETTINGS:
    results = load(setting)
    if not results:
      continue
    out += [f'## Setting {setting} ({SETTINGS[setting]})', '']
    main = {k: v for k, v in results.items() if not k.endswith('_val') and '_val_' not in k}
    out += table(main, setting) + ['']
    out += ['Paired against SGD at the same seed (points):', ''] + paired(main) + ['']
    for a, b in (('imbsam_group', 'control_group'), ('sse_sam_group', 'control_group'),
                 ('sse_sam_group', 'imbsam_group'), ('sse_sam', 'imbsam_batch'),
                 ('sse_sam_drw', 'drw')):
      line = paired_pair(results, a, b)
      if line:
        out.append(f'- {line}')
    out += [''] + grid_tables(results)
    fig = RESULTS / f'per_class_{setting}.png'
    plot_per_class(results, setting, fig)
    out += ['', f'![per-class accuracy]({fig.name})', '']
    hfig = RESULTS / f'hessian_{setting}.png'
    if plot_hessian(setting, hfig):
      out += ['Head/tail Hessian extremes during training (seed 0; 1,024 training examples, '
              'eval-mode BatchNorm, batch-normalised group losses, 12 Lanczos iterations):', '',
              f'![hessian trajectories]({hfig.name})', ''] + hessian_final(setting) + ['']
    out += [f'Compute: {compute_seconds(results) / 60:.1f} minutes of training on this machine '
            f'(2 CPU cores) for setting {setting}.', '']
  if notes.exists():
    out += [notes.read_text()]
  (RESULTS / 'REPORT.md').write_text('\n'.join(out) + '\n')
  print(f'wrote {RESULTS / "REPORT.md"}')


if __name__ == '__main__':
  write_report()
