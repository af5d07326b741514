"""Per-example losses against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sse_sam_jax import losses


def test_cross_entropy_hand_values():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])
  got = losses.cross_entropy(logits, jnp.array([0, 1]))
  np.testing.assert_allclose(got, [math.log(1 + math.exp(-2.0)), math.log(2.0)], rtol=1e-6)


def test_weighted_cross_entropy_matches_pytorch_weighted_mean():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
  y = jnp.array([0, 1, 1])
  w = np.array([1.0, 3.0])
  ce = np.array([math.log(1 + math.exp(-2.0)), math.log(2.0), math.log(1 + math.exp(2.0))])
  torch_mean = np.sum(w[[0, 1, 1]] * ce) / np.sum(w[[0, 1, 1]])
  got = losses.cross_entropy(logits, y, class_weights=w)
  assert got.shape == (3,)
  np.testing.assert_allclose(np.mean(got), torch_mean, rtol=1e-6)
  raw = losses.cross_entropy(logits, y, class_weights=w, normalize_weights=False)
  np.testing.assert_allclose(raw, w[[0, 1, 1]] * ce, rtol=1e-6)


def test_ldam_margins_and_loss():
  m = losses.ldam_margins([10000, 100, 1], max_margin=0.5)
  np.testing.assert_allclose(m, [0.05, 0.5 / math.sqrt(10), 0.5], rtol=1e-6)
  logits = jnp.array([[0.3, 0.1, -0.2]])
  got = losses.ldam(logits, jnp.array([1]), m, scale=30.0)
  z = 30.0 * np.array([0.3, 0.1 - m[1], -0.2])
  want = -(z[1] - np.log(np.sum(np.exp(z))))
  np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_class_balanced_weights():
  counts = [1000, 10]
  beta = 0.999
  raw = np.array([(1 - beta) / (1 - beta ** n) for n in counts])
  np.testing.assert_allclose(losses.class_balanced_weights(counts, beta), raw / raw.sum() * 2,
                             rtol=1e-6)
  with pytest.raises(ValueError):
    losses.class_balanced_weights(counts, 1.0)


def test_logit_adjusted_and_vs():
  counts = [300, 100]
  prior = np.array([0.75, 0.25])
  logits = jnp.array([[0.5, 0.2]])
  z = np.array([0.5, 0.2]) + 1.0 * np.log(prior)
  want = -(z[1] - np.log(np.sum(np.exp(z))))
  np.testing.assert_allclose(losses.logit_adjusted(logits, jnp.array([1]), counts, 1.0), [want],
                             rtol=1e-6)
  delta = (np.array(counts) / 300.0) ** 0.2
  z = np.array([0.5, 0.2]) * delta + 0.5 * np.log(prior)
  want = -(z[0] - np.log(np.sum(np.exp(z))))
  np.testing.assert_allclose(losses.vector_scaling(logits, jnp.array([0]), counts, 0.2, 0.5),
                             [want], rtol=1e-6)


def test_counts_validated():
  with pytest.raises(ValueError, match='positive'):
    losses.ldam_margins([10, 0])


def test_group_normalize_gives_the_group_normalised_loss():
  values = jnp.array([1.0, 2.0, 3.0, 4.0, 8.0])
  groups = jnp.array([0, 0, 1, 0, 1])
  out = losses.group_normalize(values, groups)
  # batch mean = L_head / n_head + L_tail / n_tail
  np.testing.assert_allclose(float(out.mean()), (1 + 2 + 4) / 3 + (3 + 8) / 2, rtol=1e-6)
  # a batch with one group only: a plain mean, nothing divided by an empty group
  only_head = losses.group_normalize(values, jnp.zeros(5, jnp.int32))
  np.testing.assert_allclose(np.asarray(only_head), np.asarray(values), rtol=1e-6)
  assert np.isfinite(np.asarray(only_head)).all()
