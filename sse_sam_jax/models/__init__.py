"""Flax NNX models and a functional view of them for jitted training steps."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from sse_sam_jax.models.resnet import CifarResNet, NormedLinear, ResNet, resnet32, resnet34_cifar, resnet50
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
  returned unchanged.
  """
  train_graph: Any
  eval_graph: Any

  def apply(self, params, batch_stats, x, train: bool):
    graph = self.train_graph if train else self.eval_graph
    model = nnx.merge(graph, params, batch_stats, copy=True)
    logits = model(x)
    return logits, nnx.state(model, nnx.BatchStat)


def create(name: str, num_classes: int, *, seed: int = 0, **kwargs):
  """Builds model ``name``; returns ``(FunctionalModel, params, batch_stats)``."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; choose one of {MODELS}.')
  model = _REGISTRY[name](num_classes, rngs=nnx.Rngs(seed), **kwargs)
  model.train()
  train_graph, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graph = nnx.graphdef(model)
  return FunctionalModel(train_graph, eval_graph), params, batch_stats


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
