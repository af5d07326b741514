"""The loop's throughput machinery changes nothing it trains: several steps per dispatch,
and the dispatch plan around epochs, stage switches and resumes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sse_sam_jax.models import resnet
from sse_sam_jax.train import dispatch, setup, trainer
from sse_sam_jax.train.compiled_step import CompiledTrainStep, compiler_options
from tests import golden_cases
from tests.golden_cases import as_float64
from tests.test_trainer import make_npz, set_keys, small_config


def test_dispatch_plan_keeps_chunks_inside_an_epoch_and_a_stage():
  # 8 steps per epoch, 7 full batches (the 8th partial), a stage switch at step 20
  plan = dispatch.DispatchPlan(4, steps_per_epoch=8, full_batches=7, boundaries=[20])
  dispatches = plan.dispatches(0, 32)
  assert sum(n for _, n in dispatches) == 32
  assert [s for s, n in dispatches if n > 1] == [0, 8, 16, 24]
  for start, n in dispatches:
    steps = range(start, start + n)
    assert len({s // 8 for s in steps}) == 1  # one epoch
    assert len({s >= 20 for s in steps}) == 1  # one stage
    assert n == 1 or all(s % 8 < 7 for s in steps)  # the partial batch alone
  # a resume at step 10 runs single steps up to the next chunk of its epoch (none here:
  # 12..15 would hold the partial batch); at 17 it waits for the next epoch
  assert [n for _, n in plan.dispatches(10, 16)] == [1] * 6
  assert plan.dispatches(17, 28)[:8] == [(s, 1) for s in range(17, 24)] + [(24, 4)]
  assert plan.steps_from(0, stop=3) == 1  # a stop inside the chunk splits it
  assert dispatch.DispatchPlan(1, 8, 7, []).dispatches(0, 3) == [(0, 1), (1, 1), (2, 1)]
  # a padded last batch has the full shape: every step of the epoch may be chunked
  assert dispatch.DispatchPlan(4, 8, 8, [20]).dispatches(0, 24) == [
      (0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4)]


@pytest.mark.parametrize('chunkable, k', [(170, 10), (97, 8), (48, 8), (36, 9), (60, 10),
                                          (51, 8), (28, 7), (12, 6), (5, 5), (0, 8)])
def test_auto_steps_per_dispatch_is_a_divisor_near_eight_on_accelerators(
    monkeypatch, chunkable, k):
  # the recipe (169 full batches + the padded last: 170) runs 10 per dispatch, every step
  # of an epoch in the one program of each stage; the main job (97) keeps 8 and a single
  c = small_config('unused.npz')
  assert dispatch.steps_per_dispatch(c, chunkable) == 1  # CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert dispatch.steps_per_dispatch(c, chunkable) == k
  c.steps_per_dispatch = 3
  assert dispatch.steps_per_dispatch(c, chunkable) == 3


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return make_npz(tmp_path_factory.mktemp('data') / 'blobs.npz')


def _config(npz, k):
  # 226 examples, batch 32: 8 steps per epoch (7 full); the switch at epoch 2
  return small_config(npz, **{'epochs': 3, 'optimizer.name': 'sse_sam',
                              'optimizer.gamma': 0.5, 'steps_per_dispatch': k})


def test_several_steps_per_dispatch_resume_bit_identically(npz, tmp_path):
  one = trainer.train(_config(npz, 1), tmp_path / 'one', progress=False)
  # (built in 2 background threads: the program after the first, while it trains)
  background = set_keys(_config(npz, 4), background_compile_threads=2)
  four = trainer.train(background, tmp_path / 'four', progress=False)
  assert four['timing']['programs_built_in_background'] == 1
  # stopped at step 5 (the chunk from step 4 split by the stop: step 4 alone), before the
  # first checkpoint, and rerun; every program built before step 0
  trainer.train(_config(npz, 4), tmp_path / 'resumed', progress=False, stop_after_steps=5)
  resumed = trainer.train(_config(npz, 4), tmp_path / 'resumed', progress=False)
  assert resumed['timing']['programs_built_in_background'] == 0
  assert resumed['compiles'] == 2
  # the resumed run dispatches the same steps together: bit-identical (programs built in
  # the background or not)
  jax.tree.map(np.testing.assert_array_equal, four['state'], resumed['state'])
  assert resumed['test'] == four['test']
  # per stage, one program: 1 per dispatch, the single step (the last batch padded); 4
  # per dispatch, the 4-step chunk (the padded last batch inside the epoch's second).
  # That the chunks compute the same steps is checked in float64 below:
  # in float32 the two programs round differently, and the epoch's 2-example last batch
  # amplifies that ~300x through BatchNorm (a unit whose 2 pre-activations nearly agree
  # has a batch variance near eps: 1e-7 became 2.4e-5 on an AMD EPYC, 3.6e-5 here).
  assert one['compiles'] == 2 and four['compiles'] == 2
  assert four['timing']['steps'] == one['timing']['steps'] == 24


def test_a_dispatch_of_several_steps_runs_the_same_steps_in_float64(npz):
  """The trainer's dispatch plan, programs and padding (SSE-SAM across its stage switch,
  the last batch of each epoch padded) over 3 epochs, 1 and 4 steps per dispatch, in
  float64: the same parameters and BatchNorm statistics to 1e-12 after every dispatch,
  on any CPU (float32 is compared bit for bit only within one dispatch mode, above).
  With 4 per dispatch the padded last batch runs inside a chunk (``dispatch.plan``); the
  plan of unpadded runs (chunks of the 7 full batches, the last batch alone) too."""
  with golden_cases.enable_x64():
    c = _config(npz, 1)
    run = setup.prepare(c)
    n, size, spe = len(run.data.train), run.spec.batch_size, run.steps_per_epoch
    assert run.pads_last_batch and run.boundaries == [16] and n % size == 2
    rng = np.random.default_rng(0)
    batches = []
    for epoch in range(3):
      order = rng.permutation(n)
      for s in range(spe):
        rows = order[s * size:(s + 1) * size]
        batches.append(dispatch.pad({'x': run.data.train.x[rows].astype(np.float64),
                                     'label': run.data.train.label[rows].astype(np.int32),
                                     'step': epoch * spe + s}, size, shards=1))
    ends = {}
    for k in (1, 4, 'last alone'):
      step = CompiledTrainStep(run.model, run.tx, run.loss, run.class_groups,
                               boundaries=run.boundaries,
                               compiler_options=compiler_options(c.cpu_convolutions))
      state = as_float64(jax.tree.map(jnp.copy, run.state))
      plan = (dispatch.plan(set_keys(c, steps_per_dispatch=k), run) if k != 'last alone'
              else dispatch.DispatchPlan(4, spe, n // size, run.boundaries))
      ends[k] = {}
      for first, m in plan.dispatches(0, 3 * spe):
        stacked = {key: np.stack([b[key] for b in batches[first:first + m]])
                   for key in ('x', 'label', 'mask')}
        state, _ = step(state, stacked if m > 1 else jax.tree.map(lambda a: a[0], stacked),
                        first)
        ends[k][first + m] = jax.device_get(state)
      assert step.compiles == {1: 2, 4: 2, 'last alone': 4}[k]
  # two chunks of 4 per epoch, the padded 8th batch in the second
  assert sorted(ends[4]) == [4, 8, 12, 16, 20, 24]
  # the last batch alone: a chunk of 4 from each epoch's start, then single steps
  assert sorted(ends['last alone']) == [4, 5, 6, 7, 8, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24]
  for k in (4, 'last alone'):
    for at in ends[k]:
      for a, b in zip(jax.tree.leaves(ends[1][at]), jax.tree.leaves(ends[k][at])):
        if np.issubdtype(np.asarray(a).dtype, np.floating):
          assert np.asarray(a).dtype == np.float64
          np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14,
                                     err_msg=f'{k}: after step {at}')
  # and it trained: the parameters moved
  first, last = jax.tree.leaves(run.state.params), jax.tree.leaves(ends[1][24].params)
  assert max(float(np.max(np.abs(np.asarray(a, np.float64) - b)))
             for a, b in zip(first, last)) > 1e-2


# A run with grain worker processes, in a subprocess: CIFAR-shaped batches (1.5 MB, so
# grain passes them through shared memory), 2 workers; argv: workdir, mode.
RUN_WITH_WORKERS = r'''
import sys, pathlib
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + '/benchmarks')
import loop_efficiency
from sse_sam_jax.train import periodic, trainer
from tests.test_trainer import small_config

if __name__ == '__main__':
  workdir, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
  npz = loop_efficiency.make_cifar_shaped_npz(workdir.parent / 'c.npz', 1280)
  c = small_config(npz, **{{'data.num_workers': 2, 'data.imbalance_factor': 1.0,
                           'data.batch_size': 128, 'optimizer.name': 'sgd', 'optimizer.eta': 100.0,
                           'epochs': 60 if mode == 'interrupt' else 2, 'log_every_steps': 2,
                           'optimizer.lr': 1e30 if mode == 'nan' else 0.05}})
  try:
    result = trainer.train(c, workdir, progress=False)
    print('interrupted' if result.get('interrupted') else 'finished')
  except periodic.NonFiniteLossError:
    print('stopped on NaN')
  print('done', flush=True)
'''


@pytest.mark.parametrize('mode', ['finish', 'nan', 'interrupt'])
def test_no_worker_process_or_shared_memory_outlives_a_run(tmp_path, mode):
  import pathlib
  import re
  import signal
  import subprocess
  import sys
  import time

  import psutil

  root = str(pathlib.Path(__file__).parents[1])
  script = tmp_path / 'run.py'
  script.write_text(RUN_WITH_WORKERS.format(root=root))
  workdir = tmp_path / 'run'
  proc = subprocess.Popen([sys.executable, str(script), str(workdir), mode],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  workers, deadline = set(), time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    try:
      workers |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
      break
    metrics = workdir / 'metrics.jsonl'
    if mode == 'interrupt' and metrics.exists() and metrics.read_text().count('\n') >= 2:
      proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of training
      break
    time.sleep(0.05)
  out, err = proc.communicate(timeout=240)
  if mode == 'interrupt':  # Ctrl-C: the step's checkpoint is saved and train() returns
    assert proc.returncode == 0 and 'interrupted' in out, err[-3000:]
    assert 'Ctrl-C: checkpoint saved at step' in out
  else:
    assert proc.returncode == 0, err[-3000:]
    assert ('stopped on NaN' in out) == (mode == 'nan')
  assert workers, 'grain started no worker processes'
  # Without the trainer's cleanup a finished run left 4-8 segments to the resource
  # tracker. With it, grain's own shutdown still hands at most one in-flight batch to
  # the tracker now and then (about 1 run in 4 under load), which unlinks it at exit.
  leaked = [int(n) for n in re.findall(r'appear to be (\d+) leaked shared_memory', err)]
  assert sum(leaked) <= 1, err[-2000:]
  time.sleep(0.5)
  alive = [p for p in workers if psutil.pid_exists(p)
           and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
  assert not alive, f'worker processes outlived the run: {alive}'


MULTI_DEVICE = r'''
import json, sys, pathlib, tempfile
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from sse_sam_jax.train import trainer
from tests.test_trainer import make_npz, small_config

d = pathlib.Path(tempfile.mkdtemp())
npz = make_npz(d / 'b.npz')
out = {}
for scope in ('per_device',):  # (the global scope's dispatch is tested on one device)
  for k in (1, 4):
    c = small_config(npz, **{'epochs': 2, 'optimizer.name': 'sse_sam', 'optimizer.gamma': 0.5,
                             'steps_per_dispatch': k, 'perturbation_scope': scope,
                             'data.drop_remainder': True})
    r = trainer.train(c, d / f'{scope}{k}', progress=False)
    out[f'{scope}{k}'] = [np.asarray(x).tolist() for x in jax.tree.leaves(r['state'].params)]
print(json.dumps(out))
'''


@pytest.mark.slow
def test_several_steps_per_dispatch_on_4_devices_with_per_device_perturbations():
  from tests.test_scale_out import run_with_devices
  out = run_with_devices(MULTI_DEVICE, devices=4)
  assert len(out['per_device1']) == len(out['per_device4']) > 0
  for a, b in zip(out['per_device1'], out['per_device4']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eigen_convolutions_on_cpu_compile_the_step_without_ynnpack_convolutions(monkeypatch):
  """``cpu_convolutions='eigen'`` (the default) moves XLA:CPU's convolutions off YNNPACK
  and keeps its other YNNPACK fusions; the step agrees with XLA's default to rounding."""
  import optax

  from sse_sam_jax import losses, models
  from sse_sam_jax.train import config as config_lib
  from sse_sam_jax.train.compiled_step import CompiledTrainStep, compiler_options
  from sse_sam_jax.train.step import init_state
  assert config_lib.default_config().cpu_convolutions == 'eigen'
  with pytest.raises(ValueError, match='cpu_convolutions'):
    compiler_options('mkl')
  c = config_lib.default_config()
  c.cpu_convolutions = 'mkl'
  with pytest.raises(ValueError, match='cpu_convolutions must be one of'):
    config_lib.validate(c)
  assert compiler_options('ynnpack') == {}
  if jax.default_backend() != 'cpu':
    assert compiler_options('eigen') == {}
    return
  monkeypatch.setitem(models._REGISTRY, 'cnn', _TinyCNN)  # pylint: disable=protected-access
  model, params, stats = models.create('cnn', 10, seed=0)
  tx = optax.sgd(0.1, momentum=0.9)
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  rng = np.random.default_rng(0)
  batch = {'x': jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  out, texts = {}, {}
  for setting in ('eigen', 'ynnpack'):
    step = CompiledTrainStep(model, tx, loss, compiler_options=compiler_options(setting))
    state = init_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, stats), tx)
    step.precompile(state, [batch])
    texts[setting] = next(iter(step._executables.values())).as_text()  # pylint: disable=protected-access
    out[setting], _ = step(state, batch, 0)
  assert _ynn_convolutions(texts['ynnpack']) > 0
  assert _ynn_convolutions(texts['eigen']) == 0
  assert '__ynn_fusion' in texts['eigen']  # dots and reductions stay on YNNPACK
  for a, b in zip(jax.tree.leaves(out['eigen'].params), jax.tree.leaves(out['ynnpack'].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


class _TinyCNN(nnx.Module):
  """3x3 convolutions (the models' own) 3 -> 16 -> 32 (stride 2) -> 32, BatchNorm, ReLU."""

  def __init__(self, num_classes, *, rngs):
    self.convs = nnx.List([resnet.conv(3, 16, 3, 1, rngs), resnet.conv(16, 32, 3, 2, rngs),
                           resnet.conv(32, 32, 3, 1, rngs)])
    self.bn = resnet.batch_norm(32, rngs)
    self.head = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(jnp.mean(self.bn(x), axis=(1, 2)))


def _ynn_convolutions(hlo: str) -> int:
  """How many YNNPACK fusions of a compiled program's HLO hold a convolution."""
  called = [re.search(r'calls=(%[\w.\-]+)', line).group(1) for line in hlo.splitlines()
            if '"kind":"__ynn_fusion"' in line and 'calls=' in line]
  bodies = {m.group(1): m.group(2)
            for m in re.finditer(r'^(%[\w.\-]+) \(.*?\{\n(.*?)\n\}', hlo, re.S | re.M)}
  return sum('convolution(' in bodies.get(name, '') for name in called)


def test_programs_built_in_the_background_are_each_built_once_and_give_the_same_steps():
  """``precompile(..., background_threads=1)`` returns with the first program built; the
  others are built in a thread, a step that needs one waits for it, and a cancelled
  build (an early stop) leaves the program to be built when it is needed."""
  import optax

  import sse_sam_jax as ssj
  from sse_sam_jax import losses, models
  from sse_sam_jax.train.compiled_step import CompiledTrainStep
  from sse_sam_jax.train.step import init_state
  model, params, stats = models.create('mlp', 3, in_features=4)
  tx = optax.chain(ssj.sam(0.05), optax.sgd(0.1))
  loss = lambda logits, y, step: losses.cross_entropy(logits, y)
  rng = np.random.default_rng(0)
  batches = [{'x': jnp.asarray(rng.normal(size=(b, 4)), jnp.float32),
              'label': jnp.asarray(rng.integers(0, 3, b), jnp.int32)} for b in (8, 6, 4)]
  specs = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), b) for b in batches]
  ends = {}
  for mode in ('before', 'background', 'cancelled'):
    step = CompiledTrainStep(model, tx, loss)
    state = init_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, stats), tx)
    step.precompile(state, specs, background_threads=0 if mode == 'before' else 1)
    assert step._key(step.kind_at(0), batches[0]) in step._executables  # pylint: disable=protected-access
    if mode == 'cancelled':
      step.finish_background(cancel=True)
    for i, batch in enumerate(batches * 2):
      state, _ = step(state, batch, i)
    step.finish_background()
    assert step.compiles == 3
    ends[mode] = state
  for mode in ('background', 'cancelled'):
    jax.tree.map(np.testing.assert_array_equal, ends['before'], ends[mode])
