"""The paper's CIFAR-100-LT recipe end to end, through the CLI: how long the run takes.

ResNet-34 with the CIFAR stem, batch 64, SSE-SAM (rho_head 0.05, rho_tail 0.1, gamma 0.7),
cosine lr, evaluation every epoch with flip TTA, checkpoints (``--config
cifar100_lt_ssesam`` with ``eval.every_epochs=1``), on CIFAR-shaped data of the real
sizes: synthetic uint8 32x32x3 images of 100 classes, 625 per class in the file; 20% of
each class is held out as the balanced test set (12,500 images), and the 500 per class
left are subsampled to the LDAM profile at IF 100 (10,847 training images, 500 down to 5),
since no dataset can be downloaded here. ``--epochs`` runs that many (the schedule of a
run of that length) and extrapolates to 200 from the measured compile, per-epoch
training, evaluation and checkpoint times (``results.json`` timing):

  python benchmarks/full_recipe.py --epochs 2 --precision float32
  python benchmarks/full_recipe.py --epochs 2 --precision bfloat16

prints ``full recipe: <minutes> min (<precision>, <device>)`` (measured, or extrapolated
from the epochs run, which the line says) and writes ``benchmarks/results/full_recipe_
<device>_<precision>.json``. ``--scale`` shrinks every class (a smoke test on a CPU; the
JSON records it, and the minutes are then not the recipe's).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FULL_EPOCHS = 200


def make_data(path: pathlib.Path, per_class: int, seed: int = 0) -> pathlib.Path:
  """100 classes of ``per_class`` random uint8 32x32x3 images, a class-dependent mean."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(100), per_class)
  means = rng.integers(40, 216, size=(100, 1, 1, 3))
  x = np.clip(means[labels] + rng.normal(0, 40, size=(len(labels), 32, 32, 3)), 0, 255)
  np.savez(path, x=x.astype(np.uint8), y=labels)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--precision', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--scale', type=float, default=1.0,
                      help='fraction of every class kept (1: the real sizes)')
  parser.add_argument('--imbalance-factor', type=float, default=100.0,
                      help='100: the recipe; a smaller one keeps every class of a small --scale')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('overrides', nargs='*',
                      help='further key=value overrides (a smoke test; then not the recipe)')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top  (after argparse: --help is instant)
  device = jax.devices()[0].device_kind.replace(' ', '_')
  tmp = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='full_recipe_'))
  tmp.mkdir(parents=True, exist_ok=True)
  per_class = max(10, int(round(625 * args.scale)))
  npz = make_data(tmp / f'cifar_shaped_{per_class}.npz', per_class)
  cmd = [sys.executable, '-m', 'sse_sam_jax.cli', 'train', '--config', 'cifar100_lt_ssesam',
         '--workdir', str(tmp / f'run_{args.precision}'), '--restart', '--no-progress',
         'data.name=npz', f'data.npz_path={npz}', f'data.imbalance_factor={args.imbalance_factor}',
         f'epochs={args.epochs}', 'eval.every_epochs=1', 'checkpoint.every_epochs=1',
         f'model.compute_dtype={args.precision}', 'compilation_cache_dir=', *args.overrides]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f'the run failed:\n{proc.stderr[-3000:]}')
  result = json.loads((tmp / f'run_{args.precision}' / 'results.json').read_text())
  t = result['timing']
  # Paid once, not per epoch: the steps' wait for programs built in the background, and
  # the first evaluation's compile of the prediction program (the evaluations after the
  # first show what an epoch's evaluation costs).
  wait_in_loop = t.get('compile_wait_in_loop_s', 0.0)
  evals = [json.loads(line)['eval_seconds'] for line in
           (tmp / f'run_{args.precision}' / 'metrics.jsonl').read_text().splitlines()
           if '"eval_seconds"' in line]
  eval_per_epoch = float(np.median(evals[1:])) if len(evals) > 1 else t['eval_s'] / args.epochs
  first_eval_extra = max(0.0, evals[0] - eval_per_epoch) if evals else 0.0
  per_epoch = (t['loop_s'] - t['eval_s'] - t['checkpoint_s'] - wait_in_loop) / args.epochs
  ckpt_per_epoch = t['checkpoint_s'] / args.epochs
  # start-up, data, compile (before step 0 and waited for in the loop), the first
  # evaluation's compile, the final evaluation
  overhead = wall - t['loop_s'] + wait_in_loop + first_eval_extra
  full_s = overhead + FULL_EPOCHS * (per_epoch + eval_per_epoch + ckpt_per_epoch)
  recipe = args.scale == 1.0 and args.imbalance_factor == 100.0 and not args.overrides
  measured = args.epochs == FULL_EPOCHS and recipe
  how = 'measured' if measured else f'extrapolated from {args.epochs} epoch(s)'
  scale_note = '' if recipe else (f', scale {args.scale} IF {args.imbalance_factor:g} '
                                  f'{" ".join(args.overrides)}: not the recipe')
  line = (f'full recipe: {full_s / 60:.1f} min ({args.precision}, {device}; {how}'
          f'{scale_note})')
  out = dict(precision=args.precision, device=device, epochs_run=args.epochs,
             scale=args.scale, imbalance_factor=args.imbalance_factor, overrides=args.overrides,
             train_examples=int(sum(result['class_counts'])), wall_s=round(wall, 2),
             per_epoch_train_s=round(per_epoch, 3), per_epoch_eval_s=round(eval_per_epoch, 3),
             per_epoch_checkpoint_s=round(ckpt_per_epoch, 3), overhead_s=round(overhead, 2),
             eval_seconds=evals, compile_wait_in_loop_s=wait_in_loop,
             compile_s=t['compile_s'], full_recipe_minutes=round(full_s / 60, 2),
             how=how, test_all=result['test']['all'], provenance=result.get('provenance'),
             line=line)
  path = pathlib.Path(args.out or ROOT / 'benchmarks' / 'results' /
                      f'full_recipe_{device}_{args.precision}.json')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(line)


if __name__ == '__main__':
  main()
