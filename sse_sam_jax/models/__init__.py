"""Flax NNX models and a functional view of them for jitted training steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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

  ``running_variance``: the batch variance folded into the running variance,
  ``'biased'`` (Flax's) or ``'unbiased'`` (PyTorch's; every BatchNorm must be a
  :class:`~sse_sam_jax.models.masking.MaskedBatchNorm`). ``bn_momentum``: the
  momentum shared by every BatchNorm (``None`` without BatchNorm or when they differ),
  which :meth:`fold_running_stats` needs.
  """
  train_graph: Any
  eval_graph: Any
  masks_padding: bool = False
  logits_dtype: Any = None  # mixed precision: the logits (and so the loss) in float32
  running_variance: str = 'biased'
  bn_momentum: float | None = None

  def apply(self, params, batch_stats, x, train: bool, example_mask=None):
    graph = self.train_graph if train else self.eval_graph
    model = nnx.merge(graph, params, batch_stats, copy=True)
    with masking.example_mask(example_mask), masking.running_variance(self.running_variance):
      logits = model(x)
    if self.logits_dtype is not None:
      logits = logits.astype(self.logits_dtype)
    return logits, nnx.state(model, nnx.BatchStat)

  def fold_running_stats(self, old, passes: list):
    """The running statistics after every pass of ``passes`` in turn, as a loop whose
    every training-mode forward pass updates them (PyTorch's) keeps them. Each entry is
    what :meth:`apply` returned for one pass, all from the same ``old`` statistics:
    ``momentum * old + (1 - momentum) * s_k``. With ``d_k = entry_k - momentum * old``,
    the statistics after passes 1..n are ``momentum^n old + sum_k momentum^(n-k) d_k``,
    computed in that order (no pass runs again)."""
    if not passes:
      return old
    if self.bn_momentum is None:
      raise ValueError('folding the running statistics of several passes needs every '
                       'BatchNorm of the model to have the same momentum.')
    mom = self.bn_momentum

    def fold(r0, *entries):
      r = r0
      for entry in entries:
        r = mom * r + (entry - mom * r0)
      return r

    return jax.tree.map(fold, old, *passes)


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
  momenta = {float(m.momentum) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)}
  return (FunctionalModel(train_graph, eval_graph, masking.masks_padding(model), logits_dtype,
                          bn_momentum=momenta.pop() if len(momenta) == 1 else None),
          params, batch_stats)


def _named_leaves(tree) -> dict:
  """``{'conv1/kernel': array, ...}``: the leaves of an NNX state by their path."""
  pure = nnx.to_pure_dict(tree)
  leaves, _ = jax.tree_util.tree_flatten_with_path(pure)
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in leaves}


def save_weights(path, params, batch_stats) -> None:
  """Writes ``params`` and ``batch_stats`` to the ``.npz`` at ``path``, one array per
  leaf, named ``params/<path>`` and ``batch_stats/<path>`` (e.g.
  ``params/conv1/kernel``, ``batch_stats/bn1/var``): the file that ``model.init_from``
  and :func:`load_weights` read. Weights from elsewhere (a PyTorch state dict) are
  written by filling such a file under these names, in Flax's layouts."""
  arrays = {f'params/{k}': np.asarray(v) for k, v in _named_leaves(params).items()}
  arrays.update({f'batch_stats/{k}': np.asarray(v)
                 for k, v in _named_leaves(batch_stats).items()})
  np.savez(path, **arrays)


def load_weights(path, params, batch_stats):
  """``(params, batch_stats)`` with the values of :func:`save_weights`' file at ``path``,
  cast to the dtypes of the given ones (whose structure they must have). Raises
  ``ValueError`` naming what is missing, unexpected or of another shape."""
  try:
    with np.load(path) as f:
      stored = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: cannot read the weights ({e}); write them with '
                     'sse_sam_jax.models.save_weights.') from None
  out, problems, used = [], [], set()
  for prefix, tree in (('params', params), ('batch_stats', batch_stats)):
    pure = nnx.to_pure_dict(tree)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    values = []
    for key_path, leaf in leaves:
      name = f"{prefix}/{'/'.join(str(getattr(k, 'key', k)) for k in key_path)}"
      value = stored.get(name)
      used.add(name)
      if value is None:
        problems.append(f'{name} missing')
      elif value.shape != leaf.shape:
        problems.append(f'{name} has shape {value.shape}, the model {leaf.shape}')
      values.append(leaf if value is None else jnp.asarray(value, leaf.dtype))
    pure = jax.tree_util.tree_unflatten(treedef, values)
    filled = jax.tree.map(lambda a: a, tree)  # a copy to fill
    nnx.replace_by_pure_dict(filled, pure)
    out.append(filled)
  problems += [f'{name} unexpected' for name in sorted(set(stored) - used)]
  if problems:
    shown = '; '.join(problems[:6]) + (f'; and {len(problems) - 6} more' if len(problems) > 6
                                        else '')
    raise ValueError(f'{path}: the weights do not fit the model: {shown}.')
  return out[0], out[1]


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
    'load_weights',
    'resnet32',
    'resnet34_cifar',
    'resnet50',
    'save_weights',
    'with_compute_dtype',
]
