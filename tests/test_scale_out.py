"""Multi-device: per-device (m-sharpness) perturbations against a per-shard reference,
save on 8 devices and resume on 4 and 1, collectives in the compiled step.

Each test runs in a subprocess with 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def run_with_devices(script, *args, devices=8, timeout=600):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  out = subprocess.run([sys.executable, '-c', script, str(ROOT), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


PER_DEVICE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import sse_sam_jax as ssj
from sse_sam_jax import losses, models
from sse_sam_jax.train import CompiledTrainStep, init_state

jax.config.update('jax_enable_x64', True)
B, C, D = 32, 4, 10
rng = np.random.default_rng(0)
groups = np.array([0, 0, 1, 1], np.int32)
mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
model, params0, stats0 = models.create('mlp', C, in_features=D)
params0 = jax.tree.map(lambda x: x.astype(jnp.float64), params0)
stats0 = jax.tree.map(lambda x: x.astype(jnp.float64), stats0)
loss = lambda logits, y, step: losses.cross_entropy(logits, y)
out = {}
for name, direction in [('sam', lambda: ssj.sam(0.05)), ('imbsam', lambda: ssj.imbsam(0.1)),
                        ('sse_sam', lambda: ssj.sse_sam(0.05, 0.1, 2))]:
  chain = lambda per_dev: optax.chain(direction(), *([ssj.mean_across('data')] if per_dev else []),
                                      optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  tx = chain(True)
  step = CompiledTrainStep(model, tx, loss, groups, boundaries=[2] if name == 'sse_sam' else [],
                           state_sharding=rep, batch_sharding=shard, per_device_axis='data')
  copy = lambda t: jax.tree.map(jnp.array, t)  # the step donates its state
  state = jax.device_put(init_state(copy(params0), copy(stats0), tx), rep)
  # reference: every shard on its own, directions averaged by hand, then wd + momentum
  ref_tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  ref_params, ref_stats, ref_opt = params0, stats0, ref_tx.init(params0)
  dir_tx = direction()
  dir_states = [dir_tx.init(params0) for _ in range(8)]
  for s in range(4):
    x = rng.normal(size=(B, D)); y = rng.integers(0, C, B)
    y[:8] = 0  # devices 0 and 1 hold no tail example
    batch = jax.device_put({'x': jnp.asarray(x), 'label': jnp.asarray(y, jnp.int32)}, shard)
    state, _ = step(state, batch, s)
    dirs, new_stats = [], []
    for k in range(8):
      xk, yk = jnp.asarray(x[4*k:4*k+4]), jnp.asarray(y[4*k:4*k+4], jnp.int32)
      def loss_fn(p):
        return loss(model.apply(p, ref_stats, xk, train=True)[0], yk, s)
      new_stats.append(model.apply(ref_params, ref_stats, xk, train=True)[1])
      g = jax.grad(lambda p: loss_fn(p).mean())(ref_params)
      kw = dict(loss_fn=loss_fn, group_ids=jnp.asarray(groups)[yk])
      if name == 'sse_sam':
        kw['stage'] = ssj.stage_at(s, [2])
      d, dir_states[k] = dir_tx.update(g, dir_states[k], ref_params, **kw)
      dirs.append(d)
    mean_dir = jax.tree.map(lambda *a: sum(a) / 8, *dirs)
    upd, ref_opt = ref_tx.update(mean_dir, ref_opt, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)
    ref_stats = jax.tree.map(lambda *a: sum(a) / 8, *new_stats)
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                          jax.device_get(state.params), ref_params)))
  sdiff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                           jax.device_get(state.batch_stats), ref_stats)))
  out[name] = max(diff, sdiff)
print(json.dumps(out))
'''


def test_per_device_perturbation_matches_per_shard_reference():
  diffs = run_with_devices(PER_DEVICE)
  assert set(diffs) == {'sam', 'imbsam', 'sse_sam'}
  for name, d in diffs.items():
    assert d <= 1e-12, (name, d)


RESHARD = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from tests.test_trainer import make_npz, small_config
from sse_sam_jax.train import trainer
workdir, phase = sys.argv[2], sys.argv[3]
npz = make_npz(workdir + '/blobs.npz')
c = small_config(npz, **{'optimizer.name': 'sse_sam', 'epochs': 4, 'data.drop_remainder': True,
                         'optimizer.gamma': 0.5, 'num_devices': int(sys.argv[4])})
if phase == 'stop':
  trainer.train(c, workdir + '/run', progress=False, stop_after_steps=int(sys.argv[5]))
  print(json.dumps({}))
else:
  r = trainer.train(c, workdir + '/run', progress=False)
  leaves = jax.tree.leaves(jax.device_get(r['state'].params))
  print(json.dumps({'params': [np.asarray(l).ravel().tolist() for l in leaves]}))
'''


@pytest.mark.parametrize('resume_devices', [4, 1])
def test_save_on_8_devices_resume_on_fewer(tmp_path, resume_devices):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'cut').mkdir()
  full = run_with_devices(RESHARD, tmp_path / 'full', 'run', 8)
  run_with_devices(RESHARD, tmp_path / 'cut', 'stop', 8, 17)  # 7 steps/epoch: epoch 2 saved
  resumed = run_with_devices(RESHARD, tmp_path / 'cut', 'run', resume_devices,
                             devices=resume_devices)
  import numpy as np
  for a, b in zip(full['params'], resumed['params']):
    np.testing.assert_allclose(a, b, atol=1e-5)
