"""Hessian analysis against a dense float64 Hessian on a small model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from sse_sam_jax import analysis
from sse_sam_jax.data import ClassStats, Split

IN, HID, C, N = 16, 48, 6, 240  # 1,110 parameters


def setup():
  k = jax.random.split(jax.random.key(0), 4)
  params = {'w1': jax.random.normal(k[0], (IN, HID), jnp.float64) * 0.4,
            'b1': jax.random.normal(k[1], (HID,), jnp.float64) * 0.1,
            'w2': jax.random.normal(k[2], (HID, C), jnp.float64) * 0.4,
            'b2': jnp.zeros((C,), jnp.float64)}
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, IN))
  y = rng.choice(C, size=N, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  def loss(p, x, y):
    logits = jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return params, x, y, loss


def dense_hessian(loss, params, x, y, weights):
  flat, unravel = ravel_pytree(params)
  f = lambda v: jnp.sum(jnp.asarray(weights) * loss(unravel(v), x, y))
  return np.asarray(jax.hessian(f)(flat))


@pytest.fixture(scope='module')
def problem():
  with jax.enable_x64(True):
    params, x, y, loss = setup()
    w = analysis.example_weights(y, np.ones(C, bool), C)
    g = analysis.GroupLoss(loss, params, x, y, w, batch_size=N)
    h = dense_hessian(loss, params, x, y, w)
    yield params, x, y, loss, g, h, np.linalg.eigvalsh(h)


def test_hvp_matches_dense(problem):
  params, x, y, loss, g, h, evals = problem
  with jax.enable_x64(True):
    v = jax.random.normal(jax.random.key(1), (g.dim,), jnp.float64)
    np.testing.assert_allclose(g.hvp(v), h @ np.asarray(v), rtol=1e-10, atol=1e-12)
    batched = analysis.GroupLoss(loss, params, x, y, g.weights, batch_size=64)  # 4 batches
    np.testing.assert_allclose(batched.hvp(v), h @ np.asarray(v), rtol=1e-10, atol=1e-12)


def test_lanczos_extremes_match_dense(problem):
  *_, g, h, evals = problem
  with jax.enable_x64(True):
    lo, hi = analysis.extreme_eigenvalues(g.hvp, g.dim, num_iters=150, dtype=jnp.float64)
    assert g.dim > 1000
    assert abs(hi - evals[-1]) <= 1e-6 * abs(evals[-1])
    assert abs(lo - evals[0]) <= 1e-6 * abs(evals[0])
    assert evals[0] < 0 < evals[-1]  # a saddle: both signs present
    top = analysis.power_iteration(g.hvp, g.dim, num_iters=500, tol=1e-12, dtype=jnp.float64)
    assert abs(top - evals[np.argmax(np.abs(evals))]) <= 1e-6 * np.max(np.abs(evals))


def test_hutchinson_trace_within_its_error(problem):
  *_, g, h, evals = problem
  with jax.enable_x64(True):
    est, se = analysis.hutchinson_trace(g.hvp, g.dim, num_probes=60, dtype=jnp.float64)
  assert abs(est - np.trace(h)) <= 4 * se
  assert se < 0.2 * abs(np.trace(h))


def test_slq_density_integrates_to_one_and_matches_histogram(problem):
  *_, g, h, evals = problem
  with jax.enable_x64(True):
    grid, dens, nodes, weights = analysis.slq_density(g.hvp, g.dim, num_iters=60, num_probes=4,
                                                      dtype=jnp.float64)
  assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-3  # the grid covers the smoothed mass
  # Quadrature CDF vs the dense spectrum's CDF (Kolmogorov distance).
  points = np.quantile(evals, np.linspace(0.05, 0.95, 19))
  slq_cdf = np.array([weights[nodes <= t].sum() for t in points])
  true_cdf = np.array([(evals <= t).mean() for t in points])
  assert np.max(np.abs(slq_cdf - true_cdf)) < 0.15


def test_group_hessians_add_up(problem):
  params, x, y, loss, g, h, _ = problem
  tail = np.array([False, False, False, True, True, True])
  with jax.enable_x64(True):
    head_g = analysis.GroupLoss(loss, params, x, y, analysis.example_weights(y, ~tail, C))
    tail_g = analysis.GroupLoss(loss, params, x, y, analysis.example_weights(y, tail, C))
    v = jax.random.normal(jax.random.key(2), (g.dim,), jnp.float64)
    np.testing.assert_allclose(head_g.hvp(v) + tail_g.hvp(v), g.hvp(v), rtol=1e-10, atol=1e-13)


def test_group_spectra_and_plot(tmp_path):
  with jax.enable_x64(True):
    params, x, y, loss = setup()
    split = Split(x, y, C, 'toy')
    stats = ClassStats.from_labels(y, C)
    groups = analysis.groups_for(stats, 'head_tail', eta=30)
    out = analysis.group_spectra(loss, params, split, groups, lanczos_iters=20, slq_probes=1,
                                 trace_probes=4)
  assert set(out) == {'head', 'tail'}
  tail = groups['tail']
  with jax.enable_x64(True):
    for name, classes in (('head', ~tail), ('tail', tail)):
      r = out[name]
      dense = np.linalg.eigvalsh(dense_hessian(loss, params, x, y,
                                               analysis.example_weights(y, classes, C)))
      # Ritz values lie inside the spectrum (a wrong HVP or group weighting breaks this),
      # and after 20 iterations the extremes are close to the dense ones
      assert dense[0] - 1e-9 <= r['lambda_min'] and r['lambda_max'] <= dense[-1] + 1e-9
      assert r['lambda_max'] >= dense[-1] - 1e-3 * abs(dense[-1]), (name, r, dense[-1])
      assert r['lambda_min'] <= dense[0] + 0.2 * abs(dense[0]), (name, r, dense[0])
      assert r['examples'] == int(np.isin(y, np.flatnonzero(classes)).sum())
  from sse_sam_jax.analysis import spectra
  path = spectra.write(out, tmp_path)
  assert path.exists() and (tmp_path / 'hessian_density.png').exists()


def test_bad_groups():
  y = np.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match='no example'):
    analysis.example_weights(y, np.array([False, False, True]), 3)
  with pytest.raises(ValueError, match='out of range'):
    analysis.example_weights(y, np.array([5]), 3)
  with pytest.raises(ValueError, match='names no class'):
    analysis.example_weights(y, np.zeros(3, bool), 3)


def clustered_spectrum():
  """100 eigenvalues: 3 isolated outliers (100, 50, 20) above a cluster in [0, 1]."""
  rng = np.random.default_rng(0)
  evals = np.concatenate([[100.0, 50.0, 20.0], rng.uniform(0.0, 1.0, 97)])
  q, _ = np.linalg.qr(rng.normal(size=(100, 100)))
  return (q * evals) @ q.T, np.sort(evals)


def test_lanczos_has_no_ghost_eigenvalues():
  """Without reorthogonalisation, Lanczos loses orthogonality once the outliers converge
  and repeats them ("ghosts"): the Ritz values would hold several copies of 100."""
  h, evals = clustered_spectrum()
  with jax.enable_x64(True):
    hm = jnp.asarray(h)
    alphas, betas, basis = analysis.lanczos(lambda v: hm @ v, 100, 50, jax.random.key(0),
                                            jnp.float64)
  ritz = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
  for outlier in (100.0, 50.0, 20.0):
    assert np.sum(np.abs(ritz - outlier) < 1e-3 * outlier) == 1, (outlier, ritz[-8:])
  assert np.all(ritz <= evals[-1] + 1e-9) and np.all(ritz >= evals[0] - 1e-9)
  basis = np.asarray(basis)
  np.testing.assert_allclose(basis @ basis.T, np.eye(len(basis)), atol=1e-10)


def test_slq_density_of_a_clustered_spectrum_matches_dense():
  """SLQ quadrature vs the dense eigendecomposition: the mass of each outlier is 1/200 and
  the bulk's CDF matches; ghost copies or lost orthogonality would misplace the mass.
  The mass of 1/100 per outlier is spread over 8 probes, so its estimate is noisy; the
  tolerance holds 2 standard errors."""
  h, evals = clustered_spectrum()
  with jax.enable_x64(True):
    hm = jnp.asarray(h)
    _, _, nodes, weights = analysis.slq_density(lambda v: hm @ v, 100, num_iters=50,
                                                num_probes=8, dtype=jnp.float64)
  for outlier in (100.0, 50.0, 20.0):
    near = np.abs(nodes - outlier) < 1e-3 * outlier
    assert near.sum() == 8, nodes[near]  # one node per probe, no ghost
    assert abs(weights[near].sum() - 1 / 100) < 8e-3, weights[near].sum()
  for t in (0.25, 0.5, 0.75):
    assert abs(weights[nodes <= t].sum() - np.mean(evals <= t)) < 0.08
