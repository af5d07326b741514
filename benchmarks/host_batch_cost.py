"""The host's work per training step on the recipe's data: augmentation on the host or the device.

What the trainer's loop does for every step before it calls the train step (its ``data
wait``): take the next batch from the grain iterator and place it on the devices
(``dispatch.train_batches``, ``dispatch.device_batch``), on CIFAR-100-LT of the real
sizes (10,847 training images of 32x32x3 over 100 classes, batch 64, the recipe's
dispatch plan; ``full_recipe.make_data``, standardised to float32 as the TFDS CIFAR
path stores them), for

  * ``host``: pad-crop-flip in NumPy (in grain worker processes with ``--workers``),
    the augmented float32 images sent to the device (786 KB per step);
  * ``device`` (``data.augment_on``): the host draws the crops and flips, sends indices
    and draws (1.1 KB per step, labels and mask included), and a small program on the
    device gathers and augments.

For each, the loop's seconds per step (the mean of the time in ``next`` + ``device_batch``
over ``--steps`` steps after 20 of warm-up; the device's work runs asynchronously, as in
the trainer) and the steps per second including the device's work (one wait at the end).
The model is not run: this is the data path alone, the part that can stall the step.

  python benchmarks/host_batch_cost.py [--steps 400] [--workers 0,4]

prints a line per mode and ``host batch cost: host <ms> ms, device <ms> ms per step``;
writes ``benchmarks/results/host_batch_cost_<device>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))


def standardised_npz(path: pathlib.Path) -> pathlib.Path:
  """The recipe's CIFAR-shaped data standardised to float32, as ``setup`` stores CIFAR."""
  import full_recipe  # pylint: disable=g-import-not-at-top

  from sse_sam_jax.data import augment  # pylint: disable=g-import-not-at-top
  raw = np.load(full_recipe.make_data(path.with_name('raw.npz'), 625))
  np.savez(path, x=augment.normalize_images(raw['x']), y=raw['y'])
  return path


def measure(c, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from sse_sam_jax.train import dispatch, setup  # pylint: disable=g-import-not-at-top
  run = setup.prepare(c)
  plan = dispatch.plan(c, run)
  it = iter(dispatch.train_batches(c, run))
  waits, sent, done, batch = [], 0, 0, None
  t_start = None
  for step, n in plan.dispatches(0, c.epochs * run.steps_per_epoch):
    if done == 20:  # warm-up over (workers started, the device program built)
      jax.block_until_ready(batch)
      t_start, waits = time.perf_counter(), []
    t0 = time.perf_counter()
    host = [next(it) for _ in range(n)]
    if t_start is not None:
      sent += sum(a.nbytes for b in host for k, a in b.items() if k != 'step')
    batch = dispatch.device_batch(host, step, run)
    waits.append((time.perf_counter() - t0) / n)
    done += n
    if done >= 20 + steps:
      break
  jax.block_until_ready(batch)
  total = time.perf_counter() - t_start
  if hasattr(it, 'close'):
    it.close()
  measured = done - 20
  return dict(steps=measured, steps_per_dispatch=plan.k,
              loop_ms_per_step=round(1e3 * float(np.mean(waits)), 3),
              steps_per_s_with_device_work=round(measured / total, 1),
              bytes_sent_per_step=int(sent / measured),
              device_images_bytes=run.device_images.nbytes if run.device_images else 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--workers', default='0,4',
                      help='grain worker processes of the host mode(s), comma-separated')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  from sse_sam_jax.configs import cifar100_lt_ssesam  # pylint: disable=g-import-not-at-top
  npz = standardised_npz(pathlib.Path(tempfile.mkdtemp(prefix='host_batch_cost_')) / 'c.npz')
  rows = {}
  modes = [('host', int(w)) for w in args.workers.split(',')] + [('device', 0)]
  for where, workers in modes:
    c = cifar100_lt_ssesam.get_config()
    c.data.update(name='npz', npz_path=str(npz), augment_on=where, num_workers=workers)
    c.model.name = 'mlp'  # (not run: only the state's placement depends on it)
    name = f'{where}, {workers} workers' if where == 'host' else where
    rows[name] = measure(c, args.steps)
    r = rows[name]
    print(f"{name}: {r['loop_ms_per_step']:.2f} ms per step in the loop, "
          f"{r['steps_per_s_with_device_work']:.0f} steps/s with the device's work, "
          f"{r['bytes_sent_per_step'] / 1e3:.1f} KB sent per step", flush=True)
  device = jax.devices()[0].device_kind.replace(' ', '_')
  best_host = min((r for k, r in rows.items() if k.startswith('host')),
                  key=lambda r: r['loop_ms_per_step'])
  line = (f"host batch cost: host {best_host['loop_ms_per_step']:.2f} ms, device "
          f"{rows['device']['loop_ms_per_step']:.2f} ms per step ({device}, "
          f'{jax.devices()[0].platform})')
  out = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
             batch=64, train_examples=10847, modes=rows, line=line)
  path = pathlib.Path(args.out or ROOT / 'benchmarks' / 'results' /
                      f'host_batch_cost_{device}.json')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(line)


if __name__ == '__main__':
  main()
