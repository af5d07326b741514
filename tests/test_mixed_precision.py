"""Mixed precision (``model.compute_dtype='bfloat16'``): convolutions and dense layers in
bfloat16; parameters, optimizer state, BatchNorm statistics, the loss and the update in
float32; close to the float32 step; no NaN from an empty group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sse_sam_jax import models
from sse_sam_jax.train import setup
from sse_sam_jax.train.compiled_step import CompiledTrainStep
from tests.test_trainer import make_npz, small_config


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return make_npz(tmp_path_factory.mktemp('data') / 'blobs.npz', dim=16)


def _step(npz, dtype, model='mlp', labels=None):
  c = small_config(npz, **{'optimizer.name': 'sse_sam', 'model.name': model,
                           'model.compute_dtype': dtype, 'data.pad_last_batch': False})
  run = setup.prepare(c)
  step = CompiledTrainStep(run.model, run.tx, run.loss, run.class_groups,
                           boundaries=run.boundaries)
  x = np.asarray(run.data.train.x[:32], np.float32)
  y = run.data.train.label[:32] if labels is None else np.asarray(labels, np.int32)
  batch = {'x': x, 'label': y}
  new, metrics = step(jax.tree.map(jnp.copy, run.state), batch, 0)
  return run, batch, jax.device_get(new), jax.device_get(metrics)


@pytest.mark.parametrize('model', ['mlp', 'conv1d'])
def test_bf16_computes_in_bf16_and_keeps_everything_else_float32(npz, model):
  run, batch, new, metrics = _step(npz, 'bfloat16', model)
  for leaf in jax.tree.leaves((new.params, new.batch_stats, new.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
  logits, _ = run.model.apply(run.state.params, run.state.batch_stats, batch['x'], train=True)
  assert logits.dtype == jnp.float32  # the loss is taken in float32
  hlo = jax.jit(lambda p, s, x: run.model.apply(p, s, x, train=True)[0]).lower(
      run.state.params, run.state.batch_stats, batch['x']).as_text()
  op = 'convolution' if model == 'conv1d' else 'dot_general'
  assert any(op in line and 'bf16' in line for line in hlo.splitlines()), op
  assert bool(metrics['finite'])


def test_bf16_step_is_close_to_the_float32_step_and_float32_is_unchanged(npz):
  run, _, f32, _ = _step(npz, 'float32')
  _, _, bf16, _ = _step(npz, 'bfloat16')
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(f32.params),
                                               jax.tree.leaves(run.state.params))]
  apart = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(f32.params),
                                               jax.tree.leaves(bf16.params))]
  assert max(moved) > 1e-3
  assert max(apart) <= 0.05 * max(moved), (max(apart), max(moved))
  # float32 is the models' default path: the same program as no compute dtype at all
  plain, params, stats = models.create('mlp', 4, in_features=16)
  assert plain.logits_dtype is None and run.model.logits_dtype is None


def test_bf16_with_an_empty_tail_group_stays_finite(npz):
  _, _, new, metrics = _step(npz, 'bfloat16', labels=[0] * 32)  # head only
  assert bool(metrics['finite'])
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(new.params))
