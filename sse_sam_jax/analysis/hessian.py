r"""Hessian spectra of a loss restricted to a group of classes.

The loss of group :math:`G` over a dataset of :math:`N` examples is

.. math::

   L_G(w) = \sum_{i \in G} l_i(w) / D, \qquad
   D = N \text{ (``'batch'``) or } |G| \text{ (``'group'``)},

so with ``'batch'`` the head and tail Hessians add up to the Hessian of the
mean loss. Hessian-vector products are forward-over-reverse
(``jax.jvp`` of ``jax.grad``), accumulated over the split in batches, with
BatchNorm in evaluation mode and the inputs as given (no augmentation).

On top of an ``hvp(v)`` over flat vectors: :func:`lanczos` (full
reorthogonalisation) for extreme eigenvalues, :func:`slq_density`
(stochastic Lanczos quadrature), :func:`hutchinson_trace`, and
:func:`power_iteration`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Hvp = Callable[[jax.Array], jax.Array]


def example_weights(labels, classes, num_classes: int, normalization: str = 'batch') -> np.ndarray:
  """Per-example weights of a group loss over a whole split.

  ``classes`` is a bool mask over classes or a list of class ids in ``[0, num_classes)``.
  """
  labels = np.asarray(labels)
  classes = np.asarray(classes)
  class_ids = np.flatnonzero(classes) if classes.dtype == bool else classes.astype(np.int64)
  if class_ids.size == 0:
    raise ValueError('the group names no class.')
  if np.any((class_ids < 0) | (class_ids >= num_classes)):
    raise ValueError(f'class ids {class_ids.tolist()[:10]} out of range [0, {num_classes}).')
  member = np.isin(labels, class_ids)
  if not member.any():
    raise ValueError(f'the group (classes {class_ids.tolist()[:10]}) has no example in this split.')
  if normalization == 'batch':
    return member / len(labels)
  if normalization == 'group':
    return member / member.sum()
  raise ValueError(f"normalization must be 'batch' or 'group', got {normalization!r}.")


@dataclasses.dataclass
class GroupLoss:
  """``sum_i weights[i] * loss(params, x_i, y_i)`` over a split, for HVPs in batches.

  ``per_example_loss(params, x, y) -> [B]`` must be deterministic (eval-mode BN).
  """
  per_example_loss: Callable
  params: object
  x: np.ndarray
  labels: np.ndarray
  weights: np.ndarray
  batch_size: int = 512

  def __post_init__(self):
    self.flat_params, self.unravel = ravel_pytree(self.params)

    def batch_loss(flat, x, y, w):
      return jnp.sum(w * self.per_example_loss(self.unravel(flat), x, y))

    def batch_hvp(flat, v, x, y, w):
      return jax.jvp(jax.grad(lambda p: batch_loss(p, x, y, w)), (flat,), (v,))[1]

    self._grad = jax.jit(jax.grad(batch_loss))
    self._hvp = jax.jit(batch_hvp)
    self._value = jax.jit(batch_loss)

  @property
  def dim(self) -> int:
    return self.flat_params.size

  def _batches(self):
    keep = np.flatnonzero(self.weights != 0)  # examples outside the group cost nothing
    for s in range(0, len(keep), self.batch_size):
      ids = keep[s:s + self.batch_size]
      yield self.x[ids], self.labels[ids], self.weights[ids].astype(self.flat_params.dtype)

  def hvp(self, v: jax.Array) -> jax.Array:
    total = jnp.zeros_like(self.flat_params)
    for x, y, w in self._batches():
      total = total + self._hvp(self.flat_params, v, x, y, w)
    return total

  def grad(self) -> jax.Array:
    total = jnp.zeros_like(self.flat_params)
    for x, y, w in self._batches():
      total = total + self._grad(self.flat_params, x, y, w)
    return total

  def value(self) -> float:
    return float(sum(self._value(self.flat_params, x, y, w) for x, y, w in self._batches()))


def lanczos(hvp: Hvp, dim: int, num_iters: int, key, dtype=jnp.float32):
  """Lanczos with full reorthogonalisation. Returns ``(alphas, betas, basis)``.

  ``alphas [m]`` and ``betas [m-1]`` define the tridiagonal ``T``; its
  eigenvalues (Ritz values) approximate the extreme eigenvalues of ``H``.
  Stops early (smaller ``m``) on an invariant subspace.
  """
  num_iters = min(num_iters, dim)
  v = jax.random.normal(key, (dim,), dtype)
  v = v / jnp.linalg.norm(v)
  basis = [v]
  alphas, betas = [], []
  reorth = jax.jit(lambda w, V: w - V.T @ (V @ w))
  # The basis so far, zero-padded to a fixed shape: one compiled reorthogonalisation.
  V = jnp.zeros((num_iters, dim), dtype).at[0].set(v)
  for j in range(num_iters):
    w = hvp(basis[-1])
    alpha = jnp.dot(w, basis[-1])
    alphas.append(float(alpha))
    w = reorth(reorth(w, V), V)  # twice is enough (Kahan-Parlett)
    beta = float(jnp.linalg.norm(w))
    if j == num_iters - 1 or beta < 1e-10 * max(1.0, abs(alphas[-1])):
      break
    betas.append(beta)
    basis.append(w / beta)
    V = V.at[j + 1].set(basis[-1])
  return np.asarray(alphas), np.asarray(betas), jnp.stack(basis[:len(alphas)])


def tridiagonal_eig(alphas, betas):
  t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  return np.linalg.eigh(t)


def extreme_eigenvalues(hvp: Hvp, dim: int, num_iters: int = 80, seed: int = 0,
                        dtype=jnp.float32) -> tuple[float, float]:
  """``(lambda_min, lambda_max)`` from the Ritz values of a Lanczos run."""
  alphas, betas, _ = lanczos(hvp, dim, num_iters, jax.random.key(seed), dtype)
  evals, _ = tridiagonal_eig(alphas, betas)
  return float(evals[0]), float(evals[-1])


def slq_density(hvp: Hvp, dim: int, num_iters: int = 60, num_probes: int = 4, seed: int = 0,
                grid=None, sigma: float | None = None, dtype=jnp.float32):
  """Stochastic Lanczos quadrature: eigenvalue density on ``grid`` (integrates to 1).

  Each probe gives nodes (Ritz values) and weights (squared first components of
  the Ritz vectors, summing to 1); the density is their Gaussian-smoothed
  average. Returns ``(grid, density, nodes, weights)``.
  """
  keys = jax.random.split(jax.random.key(seed), num_probes)
  nodes, weights = [], []
  for k in keys:
    alphas, betas, _ = lanczos(hvp, dim, num_iters, k, dtype)
    evals, evecs = tridiagonal_eig(alphas, betas)
    nodes.append(evals)
    weights.append(evecs[0] ** 2 / num_probes)
  nodes, weights = np.concatenate(nodes), np.concatenate(weights)
  lo, hi = nodes.min(), nodes.max()
  span = max(hi - lo, 1e-12)
  if sigma is None:
    sigma = span / 200
  if grid is None:
    grid = np.linspace(lo - 0.05 * span - 3 * sigma, hi + 0.05 * span + 3 * sigma, 2000)
  density = (weights[None, :] * np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)
             ).sum(axis=1) / (sigma * np.sqrt(2 * np.pi))
  return grid, density, nodes, weights


def hutchinson_trace(hvp: Hvp, dim: int, num_probes: int = 50, seed: int = 0,
                     dtype=jnp.float32) -> tuple[float, float]:
  """Rademacher estimate of ``tr(H)``: ``(mean, standard error)``.

  The estimator's variance is ``2 * (||H||_F^2 - sum_i H_ii^2)``; the standard
  error printed is the empirical one over the probes.
  """
  keys = jax.random.split(jax.random.key(seed), num_probes)
  samples = []
  for k in keys:
    z = jax.random.rademacher(k, (dim,), dtype)
    samples.append(float(jnp.dot(z, hvp(z))))
  samples = np.asarray(samples)
  return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(num_probes))


def power_iteration(hvp: Hvp, dim: int, num_iters: int = 100, seed: int = 0, tol: float = 1e-8,
                    dtype=jnp.float32) -> float:
  """Eigenvalue of largest magnitude by power iteration."""
  v = jax.random.normal(jax.random.key(seed), (dim,), dtype)
  v = v / jnp.linalg.norm(v)
  eig = 0.0
  for _ in range(num_iters):
    w = hvp(v)
    new = float(jnp.dot(v, w))
    norm = jnp.linalg.norm(w)
    if norm == 0:
      return 0.0
    v = w / norm
    if abs(new - eig) <= tol * max(abs(new), 1e-30):
      return new
    eig = new
  return eig
