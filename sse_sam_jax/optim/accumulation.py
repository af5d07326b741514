r"""Large batches on small memory: per-example losses evaluated in microbatches.

Gradient accumulation in the usual sense (``optax.MultiSteps``: one update of
the base optimizer every ``k`` calls, each call with a microbatch) is wrong for
the sharpness-aware transforms: the perturbation must come from the gradient
of the **whole** batch, and the perturbed gradient must be taken on the whole
batch too. So the transforms refuse ``MultiSteps`` (see
:mod:`sse_sam_jax.optim.composition`), and accumulation is done one level
down instead: :func:`microbatched` turns a per-example loss into a
``loss_fn`` over the whole batch that runs ``k`` microbatches one after the
other (``lax.map``), each under ``jax.checkpoint``. Every pass the
transformation makes — clean, perturbed, per group — then holds the
activations of one microbatch at a time, and the update is the full-batch
update:

.. math::
  l(w) = \big[\, l^{(1)}(w), \dots, l^{(k)}(w) \,\big], \qquad
  l^{(j)} = \text{per-example losses of microbatch } j.

The price is compute: the backward pass of a checkpointed microbatch re-runs
its forward pass, i.e. one extra forward per backward (SAM: 2 extra forwards
per step; ImbSAM: 3; SSE-SAM stage 1: 4).

**Where it pays.** Measured on XLA:CPU (``benchmarks/accumulation_memory.py``,
ResNet-32, batch 512): the compiled temporaries of a SAM update fall from 1,830 MiB
to 457 MiB at ``k = 4`` and 116 MiB at ``k = 16`` (SSE-SAM stage 1: 3,640 -> 461 ->
119 MiB). But XLA:CPU runs convolution backward passes inside a loop many times
slower than at top level (see :mod:`sse_sam_jax.optim.stage_switch`): a ResNet-32
SAM step at batch 128 took 54 s with ``k = 4`` against 4 s without. Use it on
GPU/TPU, where memory is what limits the batch; on CPU, prefer a smaller batch.
(Unrolling the microbatches instead of looping was tried: fast on CPU, but XLA then
keeps every microbatch's activations alive and saves no memory.)

**Exactness.** For a model whose per-example loss depends on that example
alone (no BatchNorm), the losses, and hence the SAM / ImbSAM / SSE-SAM
updates, equal the full-batch ones up to float rounding (tested to 1e-5 in
float32, 1e-12 in float64). With **BatchNorm** in training mode, each
microbatch is normalised with its own statistics ("ghost" BatchNorm of size
``B / k``): not the full-batch update, but the same thing data-parallel
training with per-device BatchNorm computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def microbatched(per_example_loss: Callable[[Any, Any], jax.Array], batch: Any,
                 num_microbatches: int, *, remat: bool = True,
                 ) -> Callable[[Any], jax.Array]:
  """Returns ``loss_fn(params) -> [B]`` that evaluates ``batch`` in microbatches.

  Args:
    per_example_loss: ``(params, microbatch) -> [B / k]`` per-example losses.
      It must be pure (no running-statistics side effects).
    batch: pytree of arrays with a leading batch dimension ``B``.
    num_microbatches: ``k``, must divide ``B``. ``k = 1`` gives
      ``per_example_loss(params, batch)`` unchanged.
    remat: wrap each microbatch in ``jax.checkpoint`` (default), so that the
      backward passes keep one microbatch's activations at a time. Without it
      ``lax.map`` saves every microbatch's residuals and little memory is saved.

  Returns:
    ``loss_fn`` for the ``loss_fn=`` extra argument of the transformations.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sse_sam_jax as ssj
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8.)
    >>> per_example = lambda w, b: (b[0] @ w - b[1]) ** 2
    >>> loss_fn = ssj.microbatched(per_example, (x, y), num_microbatches=4)
    >>> tx = optax.chain(ssj.sam(0.05), optax.sgd(0.1))
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> losses, vjp_fn = jax.vjp(loss_fn, w)
    >>> grads = vjp_fn(jnp.full_like(losses, 1 / losses.size))[0]
    >>> updates, state = tx.update(grads, state, w, loss_fn=loss_fn, loss_vjp=(losses, vjp_fn))
  """
  if isinstance(num_microbatches, bool) or int(num_microbatches) != num_microbatches \
      or num_microbatches < 1:
    raise ValueError(f'num_microbatches must be a positive integer, got {num_microbatches!r}.')
  k = int(num_microbatches)
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError('batch has no arrays.')
  size = leaves[0].shape[0] if leaves[0].ndim else None
  if size is None or any(x.ndim == 0 or x.shape[0] != size for x in leaves):
    raise ValueError('every array of batch needs the same leading batch dimension; got '
                     f'shapes {[tuple(x.shape) for x in leaves]}.')
  if size % k:
    raise ValueError(f'num_microbatches={k} does not divide the batch size {size}.')
  if k == 1:
    return lambda params: per_example_loss(params, batch)

  stacked = jax.tree_util.tree_map(lambda x: x.reshape((k, size // k) + x.shape[1:]), batch)
  body = jax.checkpoint(per_example_loss) if remat else per_example_loss

  def loss_fn(params):
    losses = jax.lax.map(lambda micro: body(params, micro), stacked)
    return jnp.reshape(losses, (size,) + losses.shape[2:])

  return loss_fn
