"""What a padded batch's mask costs per step: the trainer's step with and without it.

With ``data.pad_last_batch`` (the default) every batch carries a ``mask``, so that the
epoch's last, partial, batch runs in the full batch's program: one program per stage
instead of two. The mask is not free: ``MaskedBatchNorm`` takes masked batch
statistics, the losses are weighted ``B / count``. This measures, for the runs of
``benchmarks/loop_efficiency.py`` (``main``: the README main job; ``resnet``: ResNet-32
b128 SSE-SAM on 1,300 examples), both programs on one resident full batch, compiled once
each, then timed in alternating bursts of ``--burst`` steps (the 2-core machine drifts by
15% and more within minutes, so only back-to-back bursts compare). Each pair of bursts gives a time
ratio, masked over unmasked; the median and the range are reported.

  python benchmarks/padding_cost.py [--runs main,resnet] \
      [--out benchmarks/results/padding_cost.json]

The last printed line is ``padding cost: <max over runs of the median ratio>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loop_efficiency  # pylint: disable=g-import-not-at-top,wrong-import-position


def _compiled(c, masked: bool):
  """The run's step (its first stage), its state and one resident full batch."""
  c = copy.deepcopy(c)
  c.data.pad_last_batch = masked
  run, step_fn, batch = loop_efficiency.resident_step(c)
  if run.pads_last_batch != masked:
    raise SystemExit(f'{c.model.name}: this run does not pad its last batch (no partial one).')
  state, metrics = step_fn(run.state, batch, 0)  # compiles
  jax.block_until_ready(metrics)
  return {'step': step_fn, 'state': state, 'batch': batch, 'next': 1}


def measure(c, burst: int, rounds: int) -> dict:
  programs = {'masked': _compiled(c, True), 'unmasked': _compiled(c, False)}
  seconds = {k: [] for k in programs}
  for _ in range(rounds):
    for name, p in programs.items():
      state, t0 = p['state'], time.perf_counter()
      for i in range(p['next'], p['next'] + burst):
        state, metrics = p['step'](state, p['batch'], i)
      jax.block_until_ready((state, metrics))
      seconds[name].append(time.perf_counter() - t0)
      p['state'], p['next'] = state, p['next'] + burst
  ratios = sorted(a / b for a, b in zip(seconds['masked'], seconds['unmasked']))
  return {'burst_steps': burst, 'rounds': rounds,
          'ms_per_step': {k: round(statistics.median(v) / burst * 1e3, 3)
                          for k, v in seconds.items()},
          'ratio_median': round(statistics.median(ratios), 4),
          'ratio_min': round(ratios[0], 4), 'ratio_max': round(ratios[-1], 4)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default='main,resnet')
  parser.add_argument('--main-burst', type=int, default=50)
  parser.add_argument('--main-rounds', type=int, default=40)
  parser.add_argument('--resnet-burst', type=int, default=2)
  parser.add_argument('--resnet-rounds', type=int, default=6)
  loop_efficiency.add_resnet_arguments(parser, epochs=2)
  parser.set_defaults(resnet_examples=1300)  # 10 batches of 128 and a partial one
  parser.add_argument('--out', default='benchmarks/results/padding_cost.json')
  args = parser.parse_args()
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.runs.split(','):
      c = loop_efficiency.run_config(name, args, pathlib.Path(tmp))
      rows[name] = measure(c, getattr(args, f'{name}_burst'), getattr(args, f'{name}_rounds'))
      r = rows[name]
      print(f"{name}: {r['ms_per_step']['masked']:.2f} ms masked, "
            f"{r['ms_per_step']['unmasked']:.2f} ms unmasked (medians); masked / unmasked "
            f"over {r['rounds']} back-to-back pairs: median {r['ratio_median']:.3f} "
            f"(range {r['ratio_min']:.3f}-{r['ratio_max']:.3f})", flush=True)
  out = {'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
         'jax': jax.__version__, 'runs': rows}
  pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + '\n')
  print(f"padding cost: {max(r['ratio_median'] for r in rows.values()):.3f}")


if __name__ == '__main__':
  main()
