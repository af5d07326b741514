"""Multi-device: global mode against one device, FSDP against replicated state, per-device
(m-sharpness) and per-microbatch perturbations against a per-shard reference, save on 8
devices and resume on 4 and 1, resumes that would change the method refused.

Each test runs in a subprocess with 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``).
"""

import json
import os
import pathlib
import shutil
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
import functools, json, sys
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

  @functools.partial(jax.jit, static_argnums=6)
  def shard_direction(params, stats, dir_state, xk, yk, s, stage):
    def loss_fn(p):
      return loss(model.apply(p, stats, xk, train=True)[0], yk, s)
    g = jax.grad(lambda p: loss_fn(p).mean())(params)
    kw = dict(loss_fn=loss_fn, group_ids=jnp.asarray(groups)[yk])
    if stage is not None:
      kw['stage'] = stage
    d, dir_state = dir_tx.update(g, dir_state, params, **kw)
    return d, dir_state, model.apply(params, stats, xk, train=True)[1]

  for s in range(4):
    x = rng.normal(size=(B, D)); y = rng.integers(0, C, B)
    y[:8] = 0  # devices 0 and 1 hold no tail example
    batch = jax.device_put({'x': jnp.asarray(x), 'label': jnp.asarray(y, jnp.int32)}, shard)
    state, _ = step(state, batch, s)
    dirs, new_stats = [], []
    for k in range(8):
      xk, yk = jnp.asarray(x[4*k:4*k+4]), jnp.asarray(y[4*k:4*k+4], jnp.int32)
      d, dir_states[k], stats = shard_direction(
          ref_params, ref_stats, dir_states[k], xk, yk, s,
          ssj.stage_at(s, [2]) if name == 'sse_sam' else None)
      dirs.append(d)
      new_stats.append(stats)
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


@pytest.mark.slow
def test_per_device_perturbation_matches_per_shard_reference():
  diffs = run_with_devices(PER_DEVICE)
  assert set(diffs) == {'sam', 'imbsam', 'sse_sam'}
  for name, d in diffs.items():
    assert d <= 1e-12, (name, d)


LAYOUTS = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import sse_sam_jax as ssj
from sse_sam_jax import losses, models
from sse_sam_jax.models.resnet import batch_norm, conv
from sse_sam_jax.train import CompiledTrainStep, init_state, sharding
from sse_sam_jax.train.step import MICROBATCH_AXIS

jax.config.update('jax_enable_x64', True)
B, C = 32, 4
groups = np.array([0, 0, 1, 1], np.int32)

class OneConv(nnx.Module):  # Conv1d-BN-ReLU, pool, Dense: every kind of state in a third of
  def __init__(self, rngs):  # the 1D CNN's layers (and of its compile time: ~40 s a test)
    self.conv, self.bn = conv(1, 64, 5, 2, rngs, use_bias=True, ndim=1), batch_norm(64, rngs)
    self.head = nnx.Linear(64, C, rngs=rngs)
  def __call__(self, x):
    return self.head(jnp.mean(nnx.relu(self.bn(self.conv(x[..., None]))), axis=1))

model, params0, stats0 = models.functional(OneConv(nnx.Rngs(0)))
params0 = jax.tree.map(lambda x: np.asarray(x, np.float64), params0)
stats0 = jax.tree.map(lambda x: np.asarray(x, np.float64), stats0)
loss = lambda logits, y, step: losses.cross_entropy(logits, y)
rng = np.random.default_rng(0)
batches = []
for _ in range(4):
  y = rng.integers(0, C, B).astype(np.int32)
  y[:8] = 0  # on 8 devices, devices 0 and 1 hold no tail example
  batches.append({'x': rng.normal(size=(B, 40)), 'label': y})
METHODS = {'sam': lambda: ssj.sam(0.05), 'imbsam': lambda: ssj.imbsam(0.1),
           'sse_sam': lambda: ssj.sse_sam(0.05, 0.1, 2)}

import functools

@functools.cache
def run(method, n_dev, scope='global', params='replicated', micro=0):
  mesh = sharding.make_mesh(n_dev)
  axes = (('data',) if scope == 'per_device' else ()) + ((MICROBATCH_AXIS,) if micro else ())
  tx = optax.chain(METHODS[method](), *([ssj.mean_across(axes)] if axes else []),
                   optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  state = init_state(*jax.tree.map(jnp.array, (params0, stats0)), tx)
  shardings = sharding.state_sharding(state, mesh, params, min_elements=64)
  state = jax.device_put(state, shardings)
  step = CompiledTrainStep(model, tx, loss, groups, boundaries=[2] if method == 'sse_sam' else [],
                           state_sharding=shardings, batch_sharding=sharding.batch_sharding(mesh),
                           per_device_axis='data' if scope == 'per_device' else None,
                           microbatch=micro or None)
  for s, b in enumerate(batches):
    state, _ = step(state, jax.device_put(b, sharding.batch_sharding(mesh)), s)
  return state

def diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                             jax.tree.leaves(jax.device_get(b))))

out = {}
for method in sys.argv[2:]:
  one = run(method, 1)
  fsdp = run(method, 8, params='fsdp')
  out[method] = {
      'global8': diff(run(method, 8), one),
      'global8_fsdp': diff(fsdp, one),
      'fsdp_bytes_ratio': sharding.bytes_per_device(fsdp) / sharding.bytes_per_device(one),
      'per_device_fsdp_vs_replicated': diff(run(method, 8, 'per_device', 'fsdp'),
                                            run(method, 8, 'per_device')),
      # m = 4: per-device on 8 devices (4 examples each) == microbatches of 4 anywhere
      'micro4_1dev_vs_per_device8': diff(run(method, 1, micro=4), run(method, 8, 'per_device')),
      'micro2_per_device8_vs_1dev': diff(run(method, 8, 'per_device', micro=2),
                                         run(method, 1, micro=2)),
      'micro2_per_device8_fsdp_vs_1dev': diff(run(method, 8, 'per_device', 'fsdp', micro=2),
                                              run(method, 1, micro=2)),
      'micro2_vs_global': diff(run(method, 1, micro=2), one),
  }
# evaluation split over 8 devices (37 examples in batches of 10: padded) == unsplit
from sse_sam_jax.train import evaluate
predict = evaluate.make_predict(model)
x = rng.normal(size=(37, 40))
st = jax.device_get(run(sys.argv[2], 1))  # host arrays: usable on any mesh
whole = evaluate.predict_split(predict, st.params, st.batch_stats, x, 10)
split8 = evaluate.predict_split(predict, st.params, st.batch_stats, x, 10,
                                sharding.batch_sharding(sharding.make_mesh(8)))
out['eval_split_equal'] = bool(np.array_equal(whole, split8)) and whole.shape == (37,)
print(json.dumps(out))
'''


@pytest.mark.slow
def test_layouts_agree_in_float64():
  """Global mode on 8 devices == 1 device, FSDP == replicated, and microbatches of m
  give the same result on any device count (all float64, to 1e-12); evaluation split
  over 8 devices gives the same predictions. SSE-SAM runs both of its stages (steps 0-1
  perturb head and tail, steps 2-3 are ImbSAM's); the layouts do not depend on the
  direction, and SAM on 8 devices is compared with 1 in the trainer
  (``test_trainer.test_eight_fake_devices_match_one_device``) and per device above."""
  out = run_with_devices(LAYOUTS, 'sse_sam')
  assert out.pop('eval_split_equal')
  assert set(out) == {'sse_sam'}
  for method, r in out.items():
    for key in ('global8', 'global8_fsdp', 'per_device_fsdp_vs_replicated',
                'micro4_1dev_vs_per_device8', 'micro2_per_device8_vs_1dev',
                'micro2_per_device8_fsdp_vs_1dev'):
      assert r[key] <= 1e-12, (method, key, r[key])
    assert r['micro2_vs_global'] > 1e-3, method  # microbatches do change the method
    assert r['fsdp_bytes_ratio'] < 0.2, method  # ~1/8 of the state per device


RESHARD = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from tests.test_trainer import make_npz, small_config
from sse_sam_jax.train import sharding, trainer
workdir, phase, devices, stop = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
npz = make_npz(os.path.dirname(workdir) + '/blobs.npz')  # the same path for copied runs
c = small_config(npz, **{'optimizer.name': 'sse_sam', 'epochs': 4, 'data.drop_remainder': True,
                         'optimizer.gamma': 0.5, 'num_devices': devices, 'fsdp_min_elements': 256,
                         **json.loads(sys.argv[6])})
if phase == 'stop':
  trainer.train(c, workdir + '/run', progress=False, stop_after_steps=stop)
  print(json.dumps({}))
else:
  try:
    r = trainer.train(c, workdir + '/run', progress=False)
  except ValueError as e:
    print(json.dumps({'error': str(e)}))
    raise SystemExit
  state = r['state']
  print(json.dumps({'params': [np.asarray(l).ravel().tolist()
                               for l in jax.tree.leaves(jax.device_get(state.params))],
                    'bytes_per_device': sharding.bytes_per_device(state),
                    'specs': [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]}))
'''


def stop_after_step_17(tmp_path, name, devices, overrides):
  """A run on ``devices`` devices stopped after step 17 (7 steps/epoch: epoch 2 saved)."""
  (tmp_path / name).mkdir()
  run_with_devices(RESHARD, tmp_path / name, 'stop', devices, 17, json.dumps(overrides))
  return tmp_path / name


def resume(stopped, name, devices, overrides):
  """Resumes a copy of the ``stopped`` run on ``devices`` devices (the stopped run is
  left as it was, for other resumes)."""
  shutil.copytree(stopped, stopped.parent / name)
  return run_with_devices(RESHARD, stopped.parent / name, 'run', devices, 0,
                          json.dumps(overrides), devices=devices)


@pytest.mark.slow
def test_save_on_8_devices_resume_on_4_and_1_replicated_and_fsdp(tmp_path):
  (tmp_path / 'full').mkdir()
  full = run_with_devices(RESHARD, tmp_path / 'full', 'run', 8, 0, '{}')
  fsdp = {'parameter_sharding': 'fsdp'}
  replicated8 = stop_after_step_17(tmp_path, 'replicated8', 8, {})
  fsdp8 = stop_after_step_17(tmp_path, 'fsdp8', 8, fsdp)
  resumed = {
      'replicated 8 -> 1': resume(replicated8, 'r1', 1, {}),
      'fsdp 8 -> fsdp 4': resume(fsdp8, 'f4', 4, fsdp),
      'fsdp 8 -> replicated 1': resume(fsdp8, 'f1', 1, {}),
  }
  import numpy as np
  for name, r in resumed.items():
    for a, b in zip(full['params'], r['params']):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
  assert "'data'" in ' '.join(resumed['fsdp 8 -> fsdp 4']['specs'])  # still sharded
  assert resumed['fsdp 8 -> fsdp 4']['bytes_per_device'] < full['bytes_per_device'] / 2


@pytest.mark.slow
def test_resume_that_would_change_the_perturbation_is_refused(tmp_path):
  per_device = {'perturbation_scope': 'per_device'}
  stopped = stop_after_step_17(tmp_path, 'per_device8', 8, per_device)
  r = resume(stopped, 'on4', 4, per_device)
  assert 'per-device perturbations on 8 devices (m = 4' in r['error']
  assert "perturbation_scope='microbatch'" in r['error']
  r = resume(stopped, 'global', 8, {})
  # another scope is another experiment: refused before anything is read
  assert "perturbation_scope: 'per_device' -> 'global'" in r['error'] and '--restart' in r['error']
  # fixed microbatches do not depend on the device count: resuming on 4 is allowed
  micro = {'perturbation_scope': 'microbatch', 'perturbation_microbatch': 2}
  assert 'params' in resume(stop_after_step_17(tmp_path, 'micro8', 8, micro), 'micro4', 4, micro)


MULTIHOST = r'''
import json, sys
root, process_id, port, workdir, phase = sys.argv[1:6]
process_id = int(process_id)
sys.path.insert(0, root)
import jax
jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
from tests.test_trainer import make_npz, small_config
from sse_sam_jax.train import trainer
npz = make_npz(f'{workdir}/blobs{process_id}.npz')
c = small_config(npz, **{'optimizer.name': 'sse_sam', 'epochs': 4, 'data.drop_remainder': True,
                         'optimizer.gamma': 0.5, 'fsdp_min_elements': 256,
                         'parameter_sharding': 'fsdp'})
if phase == 'stop':
  trainer.train(c, f'{workdir}/run', progress=False, stop_after_steps=17)
  print(json.dumps({}))
elif phase == 'preempt':  # long enough to be signalled mid-run
  c.epochs, c.log_every_steps = 400, 1
  r = trainer.train(c, f'{workdir}/run', progress=False)
  print(json.dumps({'stopped_at': r.get('stopped_at'), 'preempted': r.get('preempted')}))
else:
  r = trainer.train(c, f'{workdir}/run', progress=False)
  params = multihost_utils.process_allgather(r['state'].params, tiled=True)
  print(json.dumps({'params': [np.asarray(l).ravel().tolist() for l in jax.tree.leaves(params)],
                    'test': r['test']['all'], 'hosts': jax.process_count(),
                    'devices': len(jax.devices()), 'local': len(jax.local_devices())}))
'''


def run_two_hosts(workdir, phase, timeout=600):
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, '-c', MULTIHOST, str(ROOT), str(i), str(port),
                             str(workdir), phase], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_two_processes_fsdp_killed_and_resumed_match_one_process(tmp_path):
  """2 hosts x 4 CPU devices (jax.distributed, gloo collectives), FSDP state, stopped
  after step 17 and resumed: the same parameters as one 8-device process run through."""
  (tmp_path / 'one').mkdir()
  one = run_with_devices(RESHARD, tmp_path / 'one', 'run', 8, 0, '{}')
  run_two_hosts(tmp_path, 'stop')
  hosts = run_two_hosts(tmp_path, 'run')
  import numpy as np
  for h in hosts:
    assert (h['hosts'], h['devices'], h['local']) == (2, 8, 4)
    for a, b in zip(one['params'], h['params']):
      np.testing.assert_allclose(a, b, atol=1e-5)
  assert hosts[0]['test'] == hosts[1]['test']
  # the first host alone writes the metrics; the resumed run replaced the lines of the
  # steps it redid: one line per logged step, as in the uninterrupted run
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  steps = [l['step'] for l in lines if 'train_loss' in l]
  assert steps == sorted(set(steps)) and steps[-1] == 28
  assert (tmp_path / 'run' / 'results.json').exists()


@pytest.mark.slow
def test_a_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
  """A preempted VM signals its own host only: JAX's preemption service tells the other,
  and both save a checkpoint at the same step and stop (each alone would stop wherever it
  happened to be, or not at all)."""
  import signal
  import socket
  import time
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, '-c', MULTIHOST, str(ROOT), str(i), str(port),
                             str(tmp_path), 'preempt'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # the host that does not write the logs
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [r['preempted'] for r in results] == [True, True], results
  stopped = results[0]['stopped_at']
  assert stopped == results[1]['stopped_at'] and 5 <= stopped < 400 * 8, results
  from sse_sam_jax.train import checkpointing
  assert (checkpointing.step_directory(tmp_path / 'run') / str(stopped)).exists()


PADDED_ON_DEVICES = r'''
import json, sys, pathlib, tempfile
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
jax.config.update('jax_enable_x64', True)
from sse_sam_jax.train import dispatch, setup
from sse_sam_jax.train.compiled_step import CompiledTrainStep
from tests.golden_cases import as_float64
from tests.test_trainer import make_npz, small_config

npz = make_npz(pathlib.Path(tempfile.mkdtemp()) / 'b.npz')
out = {}
for scope in ('global', 'per_device'):
  c = small_config(npz, **{'optimizer.name': 'sse_sam', 'perturbation_scope': scope,
                           'data.batch_size': 8})
  run = setup.prepare(c)  # 226 examples: the last batch has 2, one per device
  assert run.pads_last_batch
  state = jax.device_put(as_float64(jax.device_get(run.state)), run.state_sharding)
  rows = run.spec.batch_sizes(len(run.data.train))[-1]
  partial = {'x': np.asarray(run.data.train.x[-rows:], np.float64),
             'label': run.data.train.label[-rows:].astype(np.int32), 'step': 0}
  padded = dispatch.pad(partial, 8, shards=2)
  step = CompiledTrainStep(run.model, run.tx, run.loss, run.class_groups,
                           boundaries=run.boundaries, state_sharding=run.state_sharding,
                           batch_sharding=run.batch_sharding,
                           per_device_axis=run.scope.per_device_axis)
  ends = []
  for batch in (partial, padded):
    batch = jax.device_put({k: v for k, v in batch.items() if k != 'step'}, run.batch_sharding)
    new, metrics = step(jax.tree.map(jnp.copy, state), batch, 0)
    ends.append(jax.device_get((new, metrics)))
  # |a - b| / (atol + rtol |a|) with atol 1e-12, rtol 1e-9: <= 1 passes (assert_allclose)
  worst = max(float(np.max(np.abs(a - b) / (1e-12 + 1e-9 * np.abs(a))))
              for a, b in zip(jax.tree.leaves(ends[0][0]), jax.tree.leaves(ends[1][0])))
  out[scope] = {'worst': worst, 'count': [int(e[1]['count']) for e in ends]}
print(json.dumps(out))
'''


@pytest.mark.slow
def test_a_padded_last_batch_on_two_devices_takes_the_unpadded_step():
  """Padding splits over the devices as the partial batch does (each device its share of
  the real rows, then padding): the step of each perturbation scope is unchanged, float64."""
  out = run_with_devices(PADDED_ON_DEVICES, devices=2)
  for scope in ('global', 'per_device'):
    assert out[scope]['count'] == [2, 2], out
    assert out[scope]['worst'] <= 1.0, out  # to 1e-9 (atol 1e-12)


EXPLICIT_MESH = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np, optax
import sse_sam_jax as ssj

mesh = jax.make_mesh((2,), ('data',))  # Explicit axes: jax.make_mesh's default
counts = [400, 120, 30, 8]
tail = ssj.tail_classes(counts, 50)
out = {'axis_types': str(mesh.axis_types)}
rng = np.random.default_rng(0)
x_host, y_host = rng.normal(size=(8, 5)), np.arange(8) % 4
for name, make in (('sam', lambda: ssj.sam(0.05)),
                   ('imbsam', lambda: ssj.imbsam(0.1, tail_classes=tail)),
                   ('sse_sam', lambda: ssj.sse_sam(0.05, 0.1, 3, tail_classes=tail)),
                   ('focal_sam', lambda: ssj.focal_sam(0.1, lam=1.0, gamma=1.0,
                                                       class_counts=counts))):
  tx = optax.chain(make(), optax.sgd(0.1))
  params = {'w': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}

  def step(params, state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p['w'], y)
    g = jax.grad(lambda p: loss_fn(p).mean())(params)
    u, state = tx.update(g, state, params, loss_fn=loss_fn, labels=y)
    return optax.apply_updates(params, u)

  plain = jax.jit(step)(params, tx.init(params), jnp.asarray(x_host, jnp.float32),
                        jnp.asarray(y_host))
  with jax.set_mesh(mesh):
    spec = jax.sharding.NamedSharding(mesh, jax.P('data'))
    x = jax.device_put(jnp.asarray(x_host, jnp.float32), spec)
    y = jax.device_put(jnp.asarray(y_host), spec)
    sharded = jax.jit(step)(params, tx.init(params), x, y)
  out[name] = float(np.max(np.abs(np.asarray(sharded['w']) - np.asarray(plain['w']))))
print(json.dumps(out))
'''


def test_labels_work_under_a_mesh_with_explicit_axes():
  """``labels=`` under ``jax.make_mesh``'s default Explicit axes, batch sharded: the
  class-to-group lookup is elementwise (a gather had no sharding rule there); the update
  equals the unsharded one."""
  out = run_with_devices(EXPLICIT_MESH, devices=2, timeout=300)
  assert 'Explicit' in out.pop('axis_types')
  for name, diff in out.items():
    assert diff <= 1e-6, (name, diff)


SHARD_MAP_DEFAULTS = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import PartitionSpec as P
import sse_sam_jax as ssj

mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
counts = [400, 120, 30, 8]
tail = ssj.tail_classes(counts, 50)
makers = {'sam': lambda: ssj.sam(0.05), 'imbsam': lambda: ssj.imbsam(0.1, tail_classes=tail),
          'sse_sam': lambda: ssj.sse_sam(0.05, 0.1, 1, tail_classes=tail),
          'focal_sam': lambda: ssj.focal_sam(0.1, lam=1.0, gamma=1.0, class_counts=counts)}
rng = np.random.default_rng(0)
x, y = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.arange(8) % 4
out = {}
for name, make in makers.items():
  tx = optax.chain(make(), ssj.mean_across('data'), optax.sgd(0.1))
  params = {'w': jnp.asarray(rng.normal(size=(5, 4)) * 0.3, jnp.float32)}

  def local(params, state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p['w'], y)
    g = jax.grad(lambda p: loss_fn(p).mean())(params)
    u, state = tx.update(g, state, params, loss_fn=loss_fn, labels=y)
    return optax.apply_updates(params, u), state

  # check_vma=True (shard_map's default): JAX sums the gradients of the replicated
  # parameters over the devices, so each device's step is the global one on the summed
  # losses; the reference is that, unsharded: every example's loss times the devices.
  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
                            out_specs=(P(), P())))

  def reference(params, state, x, y):
    loss_fn = lambda p: 2.0 * optax.softmax_cross_entropy_with_integer_labels(x @ p['w'], y)
    g = jax.grad(lambda p: loss_fn(p).mean())(params)
    u, state = optax.chain(make(), optax.sgd(0.1)).update(g, state, params, loss_fn=loss_fn,
                                                           labels=y)
    return optax.apply_updates(params, u), state

  ref_tx = optax.chain(make(), optax.sgd(0.1))
  p, s = params, tx.init(params)
  q, r = params, ref_tx.init(params)
  for _ in range(2):  # sse_sam crosses its switch at step 1
    p, s = f(p, s, x, y)
    q, r = jax.jit(reference)(q, r, x, y)
  out[name] = float(np.max(np.abs(np.asarray(p['w']) - np.asarray(q['w']))))
  out[name + '_moved'] = float(np.max(np.abs(np.asarray(p['w']) - np.asarray(params['w']))))
print(json.dumps(out))
'''


def test_transforms_work_inside_shard_map_with_its_defaults():
  """The transforms inside a user's ``shard_map`` with its default ``check_vma=True``:
  the finiteness count is reduced over the manual axes, so the state stays replicated (it
  raised before), and the steps are what JAX's semantics make them there (the global
  step on the device-summed losses; ``check_vma=False``, the trainer's, gives per-device
  perturbations)."""
  out = run_with_devices(SHARD_MAP_DEFAULTS, devices=2, timeout=300)
  for name in ('sam', 'imbsam', 'sse_sam', 'focal_sam'):
    assert out[name] <= 1e-6, (name, out)
    assert out[name + '_moved'] > 1e-3, (name, out)
