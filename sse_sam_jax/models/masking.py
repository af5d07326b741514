"""BatchNorm that leaves padding out: a padded batch trains as the batch of its real examples.

An epoch whose size the batch size does not divide ends on a partial batch. Compiled
as it is, that batch costs a second program per stage; padded to a full batch it runs
in the full batch's program, provided the padding changes nothing. Everything else
in a step sums over examples and can weight them (the losses, the optimizers' group
sums, the metrics); BatchNorm's training-mode statistics are the one place where
examples meet inside the model. :class:`MaskedBatchNorm` computes them over the
examples of :func:`example_mask` only (``nnx.BatchNorm``'s ``mask``): the mean and
variance that the partial batch alone gives, folded into the running statistics the
same way, to float rounding (a masked mean sums in another order).

:func:`running_variance` chooses the variance folded into the running statistics:
Flax's biased batch variance (the default) or PyTorch's unbiased one
(``var * m / (m - 1)`` over the ``m`` values a channel's statistics are taken over),
as the authors' PyTorch loops keep them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

_EXAMPLE_MASK: contextvars.ContextVar = contextvars.ContextVar('example_mask', default=None)
_RUNNING_VARIANCE: contextvars.ContextVar = contextvars.ContextVar('running_variance',
                                                                  default='biased')
RUNNING_VARIANCES = ('biased', 'unbiased')


@contextlib.contextmanager
def example_mask(mask):
  """Within it, every :class:`MaskedBatchNorm` in training mode takes its statistics
  over the examples where ``mask`` (bool ``[B]``) is True; ``None``: all of them."""
  token = _EXAMPLE_MASK.set(mask)
  try:
    yield
  finally:
    _EXAMPLE_MASK.reset(token)


@contextlib.contextmanager
def running_variance(kind: str):
  """Within it, every :class:`MaskedBatchNorm` in training mode folds the ``'biased'``
  (Flax's) or the ``'unbiased'`` (PyTorch's) batch variance into its running variance;
  the batch is normalised with the biased one either way."""
  if kind not in RUNNING_VARIANCES:
    raise ValueError(f'running variance must be one of {RUNNING_VARIANCES}, got {kind!r}.')
  token = _RUNNING_VARIANCE.set(kind)
  try:
    yield
  finally:
    _RUNNING_VARIANCE.reset(token)


class MaskedBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` whose batch statistics skip the examples outside
  :func:`example_mask`, and which folds the unbiased variance into its running
  variance within :func:`running_variance` ``('unbiased')`` (the same module,
  parameters and statistics otherwise)."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    outer = _EXAMPLE_MASK.get()
    if mask is None and outer is not None:
      if outer.shape != x.shape[:1]:
        raise ValueError(f'example mask of shape {outer.shape} for a batch of shape {x.shape}.')
      mask = outer.reshape(outer.shape + (1,) * (x.ndim - 1))  # broadcasts against x
    training = not (use_running_average if use_running_average is not None
                    else self.use_running_average)
    if not training or _RUNNING_VARIANCE.get() == 'biased':
      return super().__call__(x, use_running_average, mask=mask)
    old = self.var[...]
    y = super().__call__(x, use_running_average, mask=mask)
    # Flax folded in R = momentum * old + (1 - momentum) * v (v biased, over m values);
    # PyTorch's R + (1 - momentum) * v / (m - 1) adds (R - momentum * old) / (m - 1):
    # a correction of relative size 1/m, so its rounding stays at the ulp of R.
    features = math.prod(self.var.shape)  # channels
    m = (x.size if mask is None else jnp.sum(jnp.broadcast_to(mask, x.shape))) // features
    new = self.var[...]
    denominator = jnp.maximum(m - 1, 1).astype(new.dtype)
    self.var[...] = jax.lax.stop_gradient(new + (new - self.momentum * old) / denominator)
    return y


def masks_padding(module: nnx.Module) -> bool:
  """Whether padded examples leave ``module``'s outputs on the real ones unchanged:
  every BatchNorm in it is a :class:`MaskedBatchNorm` (a model without BatchNorm
  treats examples independently). Other layers that mix examples are not detected."""
  return all(isinstance(m, MaskedBatchNorm) for _, m in nnx.iter_graph(module)
             if isinstance(m, nnx.BatchNorm))
