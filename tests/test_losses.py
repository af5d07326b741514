"""Per-example losses against hand-computed values."""

import math
import types

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


# ---------------------------------------------------------------------------------------
# Every loss x every option, against a hand formula (float64 NumPy)
# ---------------------------------------------------------------------------------------
COUNTS = np.array([400, 120, 30, 6])


def _hand_base(name, z, y, counts, l):
  """Per-example loss of ``name`` from its definition, float64."""
  prior = counts / counts.sum()
  if name == 'ldam':
    m = counts ** -0.25
    m = m * (l.ldam_max_margin / m.max())
    z = l.ldam_scale * (z - np.eye(len(counts))[y] * m[y][:, None])
  elif name == 'logit_adjusted':
    z = z + l.tau * np.log(prior)
  elif name == 'vs':
    z = z * (counts / counts.max()) ** l.vs_gamma + l.tau * np.log(prior)
  top = z.max(axis=1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
  return lse - z[np.arange(len(y)), y]


def _hand(name, z, y, counts, l, drw, grouped, mask, eta):
  real = np.ones(len(y), bool) if mask is None else np.asarray(mask)
  out = _hand_base(name, z, y, counts, l)
  n = real.sum()
  if drw:
    w = (1 - l.drw_beta) / (1 - l.drw_beta ** counts)
    w = (w / w.sum() * len(counts))[y]
    out = w * out * n / np.sum(w[real])
  if grouped:
    tail = (counts < eta)[y]
    size = {g: np.sum(real & (tail == g)) for g in (False, True)}
    out = out * n / np.array([size[g] for g in tail])
  return out[real]


@pytest.mark.parametrize('name', ['ce', 'ldam', 'logit_adjusted', 'vs'])
@pytest.mark.parametrize('drw', [False, True])
@pytest.mark.parametrize('grouped', [False, True])
@pytest.mark.parametrize('masked', [False, True])
def test_every_loss_with_every_option_against_the_hand_formula(name, drw, grouped, masked):
  """The trainer's loss (``setup.build_loss``: loss.name x DRW x loss.group_normalised x a
  padded batch's mask), with options away from their defaults, against its definition."""
  from sse_sam_jax import data as data_lib
  from sse_sam_jax.train import config as config_lib
  from sse_sam_jax.train import setup
  c = config_lib.default_config()
  l = c.loss
  l.name, l.group_normalised = name, grouped
  l.drw_epoch, l.drw_beta = (1 if drw else -1), 0.99
  l.ldam_max_margin, l.ldam_scale, l.tau, l.vs_gamma = 0.4, 20.0, 0.7, 0.3
  c.optimizer.eta = 100.0
  stats = data_lib.ClassStats(COUNTS)
  loss = setup.build_loss(c, stats, steps_per_epoch=5)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(10, 4))
  y = np.array([0, 1, 2, 3, 0, 1, 3, 0, 2, 1])
  mask = np.array([True] * 8 + [False] * 2) if masked else None
  got = loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(7),  # step 7: DRW on
             None if mask is None else jnp.asarray(mask))
  want = _hand(name, z, y, COUNTS.astype(float), l, drw, grouped, mask, 100.0)
  got = np.asarray(got)[mask if masked else slice(None)]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
  if drw:  # before its epoch DRW is off
    before = loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(4),
                  None if mask is None else jnp.asarray(mask))
    want = _hand(name, z, y, COUNTS.astype(float), l, False, grouped, mask, 100.0)
    np.testing.assert_allclose(np.asarray(before)[mask if masked else slice(None)], want,
                               rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize('name,normalize', [
    ('ce', True), ('ce', False), ('ldam', True), ('ldam', False),
    ('logit_adjusted', True), ('vs', True)])  # (these two normalise, as the references)
def test_class_weights_reach_every_loss(name, normalize):
  """``class_weights`` (and ``normalize_weights`` where the loss takes it) are applied by
  every loss, not only the plain cross-entropy."""
  z = np.random.default_rng(1).normal(size=(6, 4))
  y = np.array([0, 1, 2, 3, 3, 1])
  w = np.array([0.5, 1.0, 2.0, 4.0])
  l = types.SimpleNamespace(ldam_max_margin=0.5, ldam_scale=30.0, tau=1.0, vs_gamma=0.2)
  call = {
      'ce': lambda **kw: losses.cross_entropy(jnp.asarray(z), jnp.asarray(y), **kw),
      'ldam': lambda **kw: losses.ldam(jnp.asarray(z), jnp.asarray(y),
                                       losses.ldam_margins(COUNTS, 0.5), 30.0, **kw),
      'logit_adjusted': lambda **kw: losses.logit_adjusted(jnp.asarray(z), jnp.asarray(y),
                                                           COUNTS, 1.0, **kw),
      'vs': lambda **kw: losses.vector_scaling(jnp.asarray(z), jnp.asarray(y), COUNTS, 0.2,
                                               1.0, **kw),
  }[name]
  kw = {} if name in ('logit_adjusted', 'vs') else {'normalize_weights': normalize}
  got = np.asarray(call(class_weights=w, **kw))
  base = _hand_base(name, z, y, COUNTS.astype(float), l)
  want = w[y] * base * (len(y) / w[y].sum() if normalize else 1.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_group_normalize_with_padding_and_a_group_of_one():
  values = jnp.array([1.0, 2.0, 3.0, 4.0, 8.0, 9.0])
  groups = jnp.array([0, 0, 1, 0, 0, 1])
  mask = jnp.array([True, True, True, True, False, False])  # the last two are padding
  out = np.asarray(losses.group_normalize(values, groups, mask=mask))
  # 4 real examples: head 3 (1, 2, 4), tail 1 (3): factors 4/3 and 4/1
  np.testing.assert_allclose(out[:4], [4 / 3, 8 / 3, 12.0, 16 / 3], rtol=1e-6)
  assert np.isfinite(out).all()


def test_priors_and_weights_keep_their_dtype_and_limits():
  np.testing.assert_allclose(losses.log_prior([300, 100]), np.log([0.75, 0.25]), rtol=1e-6)
  assert losses.log_prior([3, 1]).dtype == np.float32
  w = losses.class_balanced_weights([1000, 10], beta=0.0)  # beta 0: no reweighting
  np.testing.assert_allclose(w, [1.0, 1.0])
  assert w.dtype == np.float32
  with pytest.raises(ValueError, match=r'beta must lie in \[0, 1\), got -0.5'):
    losses.class_balanced_weights([1000, 10], beta=-0.5)


@pytest.mark.parametrize('name', ['ce', 'ldam', 'logit_adjusted', 'vs'])
def test_every_loss_keeps_the_logits_dtype_in_float64_mode(name):
  """Class statistics (float64 NumPy) must not promote float32 logits once x64 is on."""
  import jax
  with jax.enable_x64(True):
    y = jnp.array([0, 3])
    for dtype in (jnp.float32, jnp.float64):
      z = jnp.zeros((2, 4), dtype)
      out = {'ce': lambda z=z: losses.cross_entropy(z, y, class_weights=np.ones(4)),
             'ldam': lambda z=z: losses.ldam(z, y, losses.ldam_margins(COUNTS), 30.0),
             'logit_adjusted': lambda z=z: losses.logit_adjusted(z, y, COUNTS),
             'vs': lambda z=z: losses.vector_scaling(z, y, COUNTS)}[name]()
      assert out.dtype == dtype, (name, dtype, out.dtype)
