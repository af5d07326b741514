"""Why a ResNet-32 step is slower on XLA:CPU than on PyTorch's CPU backend: one run, side by side.

Times, interleaved round by round on the same machine (batch 128, 32x32x3, SGD):
  trainer_step          the trainer's step (``CompiledTrainStep``: clean pass with
                        loss_vjp, metrics, finiteness check, donated state) as the
                        trainer compiles it (``cpu_convolutions='eigen'``);
  trainer_step_ynnpack  the same with XLA's default YNNPACK convolutions;
  plain_step            ``jax.grad`` of the mean cross-entropy through the same model +
                        optax SGD, nothing else, XLA's default options;
  plain_step_no_barrier the same through a copy of the model whose convolutions are
                        plain ``lax.conv_general_dilated`` (no optimization barriers,
                        see ``sse_sam_jax.models.resnet.conv_general_dilated``): the
                        step as it was before;
  forward               the training-mode forward pass alone;
  torch                 benchmarks/torch_resnet32_step.py (NCHW and channels-last), in a
                        subprocess with ``--torch-python`` (a Python with a CPU torch).
Each XLA_FLAGS setting of ``--xla-flags`` (';'-separated) reruns the JAX rows in a
fresh subprocess. ``--repeats n`` then runs ``n`` back-to-back pairs (torch, then the
trainer's step alone), each its own ratio: the rows above are minutes apart, and the
machine drifts by 15% and more between them. Writes
benchmarks/results/cpu_convolutions.json.

  python benchmarks/cpu_convolutions.py --torch-python /tmp/torchenv/bin/python --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time


def jax_rows(rounds: int, batch: int, only: str = '') -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from sse_sam_jax import losses, models
  from sse_sam_jax.models import resnet
  from sse_sam_jax.train import CompiledTrainStep, init_state
  from sse_sam_jax.train.compiled_step import compiler_options

  rng = np.random.default_rng(0)
  data = {'x': jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  model, params, stats = models.create('resnet32', 10, seed=0)
  tx = optax.chain(optax.add_decayed_weights(2e-4), optax.sgd(0.1, momentum=0.9))
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  trainer_step = CompiledTrainStep(model, tx, loss, compiler_options=compiler_options('eigen'))
  trainer_step_ynnpack = CompiledTrainStep(model, tx, loss,
                                           compiler_options=compiler_options('ynnpack'))
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  state = init_state(copy(params), copy(stats), tx)
  barrier_conv = resnet.conv_general_dilated
  resnet.conv_general_dilated = jax.lax.conv_general_dilated  # a model built as before
  try:
    model_no_barrier, _, _ = models.create('resnet32', 10, seed=0)
  finally:
    resnet.conv_general_dilated = barrier_conv

  def make_plain_step(model):
    @jax.jit
    def plain_step(params, stats, opt_state, x, y):
      def mean_loss(p):
        logits, new_stats = model.apply(p, stats, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats
      grads, new_stats = jax.grad(mean_loss, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_stats, opt_state
    return plain_step

  plain_step, plain_step_no_barrier = make_plain_step(model), make_plain_step(model_no_barrier)

  forward = jax.jit(lambda p, s, x: model.apply(p, s, x, train=True))
  plain_args = (copy(params), copy(stats), tx.init(params), data['x'], data['label'])

  runs = {
      'trainer_step': lambda: trainer_step(copy(state), data, 0),
      'trainer_step_ynnpack': lambda: trainer_step_ynnpack(copy(state), data, 0),
      'plain_step': lambda: plain_step(*plain_args),
      'plain_step_no_barrier': lambda: plain_step_no_barrier(*plain_args),
      'forward': lambda: forward(params, stats, data['x']),
  }
  if only:
    runs = {k: v for k, v in runs.items() if k in only.split(',')}
  for fn in runs.values():  # compile + warm
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {k: [] for k in runs}
  for _ in range(rounds):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=9)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--torch-python', default='')
  parser.add_argument('--xla-flags', default='')
  parser.add_argument('--repeats', type=int, default=0,
                      help='then this many more side-by-side pairs (torch, then the '
                           "trainer's step), alternating, each giving a ratio")
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--only', default='', help=argparse.SUPPRESS)
  parser.add_argument('--out', default='benchmarks/results/cpu_convolutions.json')
  args = parser.parse_args()
  if args.child:
    print(json.dumps(jax_rows(args.rounds, args.batch, args.only)))
    return

  here = pathlib.Path(__file__).resolve().parent
  results = {'batch': args.batch, 'rounds': args.rounds, 'cpu_count': os.cpu_count(), 'jax': {}}
  def jax_child(flags='', only=''):
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONWARNINGS='ignore')
    out = subprocess.run([sys.executable, __file__, '--child', '--rounds', str(args.rounds),
                          '--batch', str(args.batch), '--only', only],
                         env=env, capture_output=True, text=True)
    if out.returncode:
      return {'error': out.stderr.strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])

  def torch_rows():
    rows = {}
    for extra in ([], ['--channels-last']):
      out = subprocess.run([args.torch_python, str(here / 'torch_resnet32_step.py'),
                            '--batch', str(args.batch)] + extra,
                           capture_output=True, text=True, check=True)
      rows['channels_last' if extra else 'nchw'] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows

  for flags in [''] + [f for f in args.xla_flags.split(';') if f]:
    results['jax'][flags or 'default'] = jax_child(flags)
    print(flags or 'default', results['jax'][flags or 'default'], flush=True)
  if args.torch_python:
    results['torch'] = torch_rows()
    print('torch', results['torch'], flush=True)
    best_torch = min(r['median_ms'] for r in results['torch'].values())
    base = results['jax']['default']
    results['ratios_to_torch'] = {k: round(v / best_torch, 2) for k, v in base.items()}
    print('ratios to torch (default flags):', results['ratios_to_torch'])
    # The machine drifts between the runs above (minutes apart): pairs of one torch run
    # and one run of the trainer's step, back to back, give ratios of their own.
    pairs = []
    for _ in range(args.repeats):
      torch_ms = min(r['median_ms'] for r in torch_rows().values())
      jax_ms = jax_child(only='trainer_step')['trainer_step']
      pairs.append({'torch_ms': torch_ms, 'trainer_step_ms': jax_ms,
                    'ratio': round(jax_ms / torch_ms, 2)})
      print('pair', pairs[-1], flush=True)
    if pairs:
      ratios = sorted(p['ratio'] for p in pairs)
      results['pairs'] = {'runs': pairs, 'ratio_median': statistics.median(ratios),
                          'ratio_min': ratios[0], 'ratio_max': ratios[-1]}
      print(f"trainer step / torch, {len(pairs)} back-to-back pairs: median "
            f"{statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
