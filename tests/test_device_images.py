"""Augmentation on the device (data.augment_on): the same batches as the host's, bit for bit."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sse_sam_jax.data import augment
from sse_sam_jax.train import config as config_lib
from sse_sam_jax.train import device_images as device_images_lib
from sse_sam_jax.train import dispatch, resume, setup, trainer
from tests.test_trainer import set_keys


def _images(n=40, dtype=np.uint8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, size=(n, 6, 5, 3))
  return x.astype(dtype) if dtype == np.uint8 else (x / 255.0 - 0.5).astype(dtype)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
@pytest.mark.parametrize('lead', [(), (3,)])
def test_pad_crop_flip_on_device_is_the_hosts(dtype, lead):
  images = _images(dtype=dtype)
  b, pad = 50, 2
  rng = np.random.default_rng(1)
  ids = rng.integers(0, len(images), size=lead + (b,)).astype(np.int32)
  draws = [augment.pad_crop_flip_draws(b, rng, pad) for _ in range(int(np.prod(lead)))]
  stack = {k: np.stack([d[k] for d in draws]).reshape(lead + (b,)) for k in draws[0]}
  # every offset (0..2 pad on both axes) and both flips occur
  assert set(stack['dy'].ravel()) == set(range(2 * pad + 1)) == set(stack['dx'].ravel())
  assert stack['flip'].any() and not stack['flip'].all()
  out = jax.jit(augment.pad_crop_flip_on_device, static_argnums=5)(
      images, ids, stack['dy'], stack['dx'], stack['flip'], pad)
  assert out.shape == lead + (b,) + images.shape[1:] and out.dtype == dtype
  flat = {k: v.reshape(-1, b) for k, v in stack.items()}
  want = np.stack([augment.apply_pad_crop_flip(images[i], flat['dy'][j], flat['dx'][j],
                                               flat['flip'][j], pad)
                   for j, i in enumerate(ids.reshape(-1, b))]).reshape(out.shape)
  np.testing.assert_array_equal(np.asarray(out), want)


def test_the_draws_are_pad_crop_flips():
  x = _images()
  np.testing.assert_array_equal(
      augment.pad_crop_flip(x, np.random.default_rng(3)),
      augment.apply_pad_crop_flip(x, **augment.pad_crop_flip_draws(len(x),
                                                                   np.random.default_rng(3))))


def _npz(path, n_per_class=(30, 12, 5), seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(len(n_per_class)), n_per_class)
  x = rng.integers(0, 256, size=(len(y), 8, 8, 3)).astype(np.uint8)
  np.savez(path, x=x, y=y)
  return path


def _config(npz, **overrides):
  c = config_lib.default_config()
  c.epochs = 2
  c.data.update(name='npz', npz_path=str(npz), imbalance_factor=1.0, batch_size=8,
                augment=True, shots='default')
  c.model.name = 'mlp'
  c.optimizer.update(name='sse_sam', eta=10.0, gamma=0.5)
  c.eval.every_epochs = 1
  c.compilation_cache_dir = ''
  return set_keys(c, **overrides)


def _device_batches(c):
  with setup.precision(c):  # (float64: JAX's x64 mode)
    return _device_batches_in(c)


def _device_batches_in(c):
  run = setup.prepare(c)
  order = dispatch.train_batches(c, run)
  plan = dispatch.plan(c, run)
  it, out = iter(order), []
  for step, n in plan.dispatches(0, c.epochs * run.steps_per_epoch):
    batch = dispatch.device_batch([next(it) for _ in range(n)], step, run)
    out.append(jax.tree.map(np.asarray, batch))
  return run, out


@pytest.mark.parametrize('dtype, k', [('float32', 2), ('float64', 2), ('float32', 5)])
def test_device_batches_equal_the_hosts_padded_and_stacked(tmp_path, dtype, k):
  # 37 examples in batches of 8: 5 steps per epoch, the 5th padded from 5 to 8 rows; 2
  # per dispatch: 2 chunks and the padded batch alone; 5: the padded batch in the chunk
  npz = _npz(tmp_path / 'd.npz')
  batches = {}
  for where in ('host', 'device'):
    c = _config(npz, **{'data.augment_on': where, 'model.param_dtype': dtype,
                        'steps_per_dispatch': k})
    run, batches[where] = _device_batches(c)
    assert (run.device_images is not None) == (where == 'device')
  host, device = batches['host'], batches['device']
  assert run.device_images.images.dtype == np.uint8  # stored as read; cast per batch
  assert run.pads_last_batch and any(not b['mask'].all() for b in host)
  assert {b['label'].shape for b in host} == ({(2, 8), (8,)} if k == 2 else {(5, 8)})
  assert len(host) == len(device)
  for h, d in zip(host, device):
    assert sorted(h) == sorted(d) == ['label', 'mask', 'x']
    for key in h:
      assert h[key].dtype == d[key].dtype and h[key].shape == d[key].shape, key
      np.testing.assert_array_equal(h[key], d[key], err_msg=key)
  assert host[0]['x'].dtype == np.dtype(dtype)
  assert run.device_images.compiles == (2 if k == 2 else 1)  # one per batch shape


def test_training_is_the_same_on_the_host_and_the_device(tmp_path):
  # SGD (the batches are what differs), 5 steps per dispatch with the padded last batch
  # inside: the last checkpoint's parameters and BatchNorm statistics are bit-identical
  npz = _npz(tmp_path / 'd.npz')
  models = {}
  for where in ('host', 'device'):
    c = _config(npz, **{'data.augment_on': where, 'steps_per_dispatch': 5,
                        'optimizer.name': 'sgd'})
    result = trainer.train(c, tmp_path / where, progress=False)
    assert result['timing']['steps'] == 10
    _, models[where], _ = resume.restore_model(c, tmp_path / where)
  assert models['host']['step'] == models['device']['step'] == 10
  for name in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, models['host'][name], models['device'][name])


def test_auto_choice_and_errors():
  on = device_images_lib.on_device
  x = np.zeros((4, 2, 2, 3), np.uint8)
  assert on('auto', True, x) and on('device', True, x)
  assert not on('auto', False, x) and not on('host', True, x) and not on('device', False, x)
  assert not on('auto', True, np.zeros((4, 40), np.float32))  # not images
  big = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (device_images_lib.MAX_BYTES + 1,
                                                                1, 1, 1), (0, 0, 0, 0))
  assert not on('auto', True, big) and on('device', True, big)
  with pytest.raises(ValueError, match=r"augment_on='device' needs the training images in "
                                       r'memory'):
    on('device', True, np.zeros((4, 40), np.float32))
  with pytest.raises(ValueError, match='data.augment_on must be one of'):
    on('gpu', True, x)


_EIGHT_DEVICES = '''
import sys, pathlib, numpy as np
sys.path.insert(0, 'tests')
import test_device_images as t
npz = t._npz(pathlib.Path(sys.argv[1]), n_per_class=(40, 20, 10))  # 56 train: 16 x 3 + 8
out = {}
for where in ('host', 'device'):
  c = t._config(npz, **{'data.augment_on': where, 'data.batch_size': 16, 'num_devices': 8,
                        'steps_per_dispatch': 2})
  run, out[where] = t._device_batches(c)
  assert run.mesh.devices.size == 8 and run.pads_last_batch
assert any(not b['mask'].all() for b in out['host'])
assert run.device_images.images.sharding.is_fully_replicated
for h, d in zip(out['host'], out['device'], strict=True):
  for k in h:
    np.testing.assert_array_equal(h[k], d[k])
print('equal on 8 devices')
'''


def test_device_batches_equal_the_hosts_on_eight_devices(tmp_path):
  # the images replicated, indices and draws sharded over 8 devices, a padded last batch
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES, str(tmp_path / 'd.npz')],
                       cwd=pathlib.Path(__file__).parents[1], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'equal on 8 devices' in out.stdout
