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
"""

from __future__ import annotations

import contextlib
import contextvars

from flax import nnx

_EXAMPLE_MASK: contextvars.ContextVar = contextvars.ContextVar('example_mask', default=None)


@contextlib.contextmanager
def example_mask(mask):
  """Within it, every :class:`MaskedBatchNorm` in training mode takes its statistics
  over the examples where ``mask`` (bool ``[B]``) is True; ``None``: all of them."""
  token = _EXAMPLE_MASK.set(mask)
  try:
    yield
  finally:
    _EXAMPLE_MASK.reset(token)


class MaskedBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` whose batch statistics skip the examples outside
  :func:`example_mask` (the same module, parameters and statistics otherwise)."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    outer = _EXAMPLE_MASK.get()
    if mask is None and outer is not None:
      if outer.shape != x.shape[:1]:
        raise ValueError(f'example mask of shape {outer.shape} for a batch of shape {x.shape}.')
      mask = outer.reshape(outer.shape + (1,) * (x.ndim - 1))  # broadcasts against x
    return super().__call__(x, use_running_average, mask=mask)


def masks_padding(module: nnx.Module) -> bool:
  """Whether padded examples leave ``module``'s outputs on the real ones unchanged:
  every BatchNorm in it is a :class:`MaskedBatchNorm` (a model without BatchNorm
  treats examples independently). Other layers that mix examples are not detected."""
  return all(isinstance(m, MaskedBatchNorm) for _, m in nnx.iter_graph(module)
             if isinstance(m, nnx.BatchNorm))
