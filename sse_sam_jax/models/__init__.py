"""Flax NNX models and a functional view of them for jitted training steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sse_sam_jax.models import masking
from sse_sam_jax.models.masking import MaskedBatchNorm
from sse_sam_jax.models.resnet import (
  CifarResNet,
  NormedLinear,
  ResNet,
  resnet32,
  resnet34_cifar,
  resnet50,
)
from sse_sam_jax.models.small import MLP, Conv1DNet

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    'resnet32': resnet32,
    'resnet34_cifar': resnet34_cifar,
    'resnet50': resnet50,
    'conv1d': Conv1DNet,
    'mlp': lambda num_classes, *, rngs, in_features, **kw: MLP(in_features, num_classes,
                                                              rngs=rngs, **kw),
}
MODELS = tuple(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
  """A model as two pure functions of ``(params, batch_stats)``.

  ``apply(params, batch_stats, x, train)`` returns ``(logits, new_batch_stats)``.
  In training mode BatchNorm normalises with the statistics of the whole batch ``x``
  and the returned running statistics are updated; in eval mode they are used and
  returned unchanged. ``example_mask`` (bool ``[B]``) leaves the examples where it is
  False out of the statistics of every :class:`~sse_sam_jax.models.masking.MaskedBatchNorm`
  (padding); ``masks_padding`` says whether that makes padding invisible to the real
  examples (see :func:`~sse_sam_jax.models.masking.masks_padding`).
  """
  train_graph: Any
  eval_graph: Any
  masks_padding: bool = False
  logits_dtype: Any = None  # mixed precision: the logits (and so the loss) in float32

  def apply(self, params, batch_stats, x, train: bool, example_mask=None):
    graph = self.train_graph if train else self.eval_graph
    model = nnx.merge(graph, params, batch_stats, copy=True)
    with masking.example_mask(example_mask):
      logits = model(x)
    if self.logits_dtype is not None:
      logits = logits.astype(self.logits_dtype)
    return logits, nnx.state(model, nnx.BatchStat)


def create(name: str, num_classes: int, *, seed: int = 0, compute_dtype=None, **kwargs):
  """Builds model ``name``; returns ``(FunctionalModel, params, batch_stats)``
  (:func:`functional` of the module). ``compute_dtype`` (e.g. ``jnp.bfloat16``): mixed
  precision, see :func:`with_compute_dtype`; ``None``: everything in the parameters'
  dtype (float32)."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; choose one of {MODELS}.')
  model = initialised(lambda: _REGISTRY[name](num_classes, rngs=nnx.Rngs(seed), **kwargs))
  if compute_dtype is None:
    return functional(model)
  return functional(with_compute_dtype(model, compute_dtype), logits_dtype=jnp.float32)


def with_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
  """Mixed precision: every convolution and dense layer computes in ``dtype`` (inputs
  and kernels cast to it: bfloat16 runs on tensor cores and TPU MXUs), every BatchNorm
  in float32 (its statistics and normalisation); the parameters, their gradients, the
  optimizer state, the perturbation and the update stay in the parameters' dtype.
  :func:`functional` with ``logits_dtype=jnp.float32`` then gives float32 logits, so
  the loss is float32. Returns ``model``, changed in place."""
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      module.dtype = jnp.float32
    elif isinstance(module, (nnx.Conv, nnx.Linear)):
      module.dtype = dtype
  return model


# XLA:CPU at its default -O3 takes seconds to compile some random-number kernels (5 s for
# the threefry of one (3, 3, 16, 16) kernel), so a ResNet-32 built op by op took 14 s to
# initialise. At -O1 the whole initialisation compiles as one program in ~4 s and gives
# the same bits as op by op at -O3 (every registered model: conv1d and mlp in
# tests/test_models.py, the ResNets compared by hand); at -O0 some normal draws differ by
# an ulp.
_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def initialised(build: Callable[[], nnx.Module]) -> nnx.Module:
  """``build()`` (a module constructor that makes its own ``nnx.Rngs``) run as one
  compiled program: the same values as calling it, without compiling each layer's
  random draws on their own."""
  graphdef = nnx.graphdef(nnx.eval_shape(build))
  options = _INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()), compiler_options=options)())


def functional(model: nnx.Module, logits_dtype=None):
  """Any Flax NNX classifier as ``(FunctionalModel, params, batch_stats)``, for
  :class:`~sse_sam_jax.train.CompiledTrainStep` and the analysis tools: your own
  architecture in place of the built-in ones of :func:`create`.

  >>> from flax import nnx
  >>> from sse_sam_jax import models
  >>> net = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
  ...                      nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
  >>> model, params, batch_stats = models.functional(net)
  >>> logits, new_stats = model.apply(params, batch_stats, jax.numpy.ones((4, 3)), train=True)
  >>> logits.shape, models.count_params(params), models.count_params(batch_stats)
  ((4, 2), 66, 16)
  """
  model.train()
  train_graph, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graph = nnx.graphdef(model)
  return (FunctionalModel(train_graph, eval_graph, masking.masks_padding(model), logits_dtype),
          params, batch_stats)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))

__all__ = [
    'CifarResNet',
    'Conv1DNet',
    'FunctionalModel',
    'MLP',
    'MaskedBatchNorm',
    'NormedLinear',
    'ResNet',
    'count_params',
    'create',
    'functional',
    'initialised',
    'resnet32',
    'resnet34_cifar',
    'resnet50',
    'with_compute_dtype',
]
