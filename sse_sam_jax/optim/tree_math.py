"""Tree-wide dot products and norms, accumulated in at least float32 (float64 stays
float64): the one place the optimizers take them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulation_dtype(*trees):
  """float32, or the widest floating dtype among the leaves of ``trees`` if wider."""
  return jnp.result_type(jnp.float32, *[x.dtype for t in trees for x in jax.tree.leaves(t)])


def tree_dot(a, b) -> jax.Array:
  """:math:`\\sum_\\ell \\langle a_\\ell, b_\\ell \\rangle` over the leaves of two trees."""
  dtype = accumulation_dtype(a, b)
  return sum((jnp.vdot(x.astype(dtype), y.astype(dtype))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros([], dtype))


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves of ``tree``."""
  leaves = jax.tree.leaves(tree)
  dtype = accumulation_dtype(leaves)
  return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(dtype))) for x in leaves),
                      jnp.zeros([], dtype)))
