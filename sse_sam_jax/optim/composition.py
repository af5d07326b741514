r"""How the sharpness-aware transforms sit inside optax compositions.

The transforms **replace** the gradient they receive by a direction computed
from ``loss_fn`` at perturbed weights. That makes some compositions wrong in a
way nothing would show, so :func:`check_composition` refuses them when the
transform is traced or called (a Python-side check: no cost in the compiled
program):

=============================================  =====================================
composition                                    what happens
=============================================  =====================================
``optax.chain(t_before, ssj.sam(...), ...)``   refused: ``t_before`` (clipping, weight
                                               decay, ...) would have no effect or
                                               change the ascent direction; put it
                                               after the transform
``optax.MultiSteps(chain(ssj.sam(...), ...))``  refused: the transform would see the
                                               last microbatch only; use
                                               :func:`sse_sam_jax.microbatched`
``optax.apply_if_finite(chain(ssj.sam, ...))``  refused: it checks the gradient at
                                               ``w`` only; put it after the transform
``optax.masked`` / ``optax.partition``          refused: ``loss_fn`` needs all the
                                               parameters; use ``mask=``
=============================================  =====================================

:func:`bind_extra_args` fixes the extra arguments of a transformation, for
wrappers that do not forward them (``optax.lookahead``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import optax


def _code(fn):
  return getattr(fn, '__code__', None)


@functools.lru_cache(maxsize=1)
def _wrapper_codes():
  """Code objects of the optax functions whose frames the guard looks for."""
  codes = {}
  identity = optax.identity()
  codes['chain'] = _code(optax.chain(identity).update)
  if hasattr(optax, 'named_chain'):
    codes['named_chain'] = _code(optax.named_chain(('a', identity)).update)
  codes['apply_if_finite'] = _code(optax.apply_if_finite(identity, 1).update)
  codes['MultiSteps'] = _code(optax.MultiSteps.update)
  codes['flatten'] = _code(optax.flatten(identity).update)
  return {v: k for k, v in codes.items() if v is not None}




def _frames():
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None:
    yield frame
    frame = frame.f_back


def _masked_node(tree) -> bool:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return any(isinstance(x, optax.MaskedNode) for x in leaves)


def check_composition(name: str, params: Any) -> None:
  """Raises when ``name``'s transform sits in a composition it cannot honour.

  Called by every sharpness-aware ``update``; looks at the Python call stack
  (only while tracing or running eagerly, never inside the compiled program).
  """
  if params is not None and _masked_node(params):
    raise TypeError(
        f'ssj.{name} inside optax.masked / optax.partition: the transform calls loss_fn '
        'with the parameters it receives, and the wrapper hides the unmasked ones. '
        f'Perturb a subset natively instead: ssj.{name}(..., mask=<pytree of bools or '
        'callable params -> bools>); the gradient of every parameter is still returned.')
  for frame in _frames():
    kind = _wrapper_codes().get(frame.f_code)
    if kind is None:
      continue
    if kind == 'MultiSteps':
      raise TypeError(
          f'ssj.{name} inside optax.MultiSteps would be silently wrong: the accumulated '
          'gradient reaches it, but loss_fn (and the group ids) are those of the last '
          'microbatch alone, so the perturbation and the perturbed gradient ignore the '
          'other microbatches. Evaluate the whole batch in microbatches instead: '
          'loss_fn = ssj.microbatched(per_example_loss, batch, num_microbatches=k), '
          'then one update per batch (see sse_sam_jax.optim.accumulation).')
    if kind == 'flatten':
      raise TypeError(
          f'ssj.{name} inside optax.flatten: the transform calls loss_fn with the parameters '
          'it receives, which flatten turns into one vector. Flatten the base optimizer '
          f'only: optax.chain(ssj.{name}(...), optax.flatten(optax.sgd(...))).')
    if kind == 'apply_if_finite':
      raise TypeError(
          f'optax.apply_if_finite around ssj.{name} checks only the incoming gradient at w, '
          'so a loss that is finite at w and not at the perturbed point still reaches the '
          f'parameters (and the perturbed passes run inside lax.cond). Put it after the '
          f'transform, where it sees the perturbed direction: optax.chain(ssj.{name}(...), '
          'optax.apply_if_finite(optax.sgd(...), max_consecutive_errors)).')
    position = len(frame.f_locals.get('new_state', ()))
    if position > 0:
      raise TypeError(
          f'ssj.{name} is transformation #{position} of an optax.{kind}, after '
          f'{position} other(s). It replaces the gradient it receives, so what comes '
          'before it (gradient clipping, weight decay, scaling) would have no effect or '
          'would change the ascent direction. Put it first and everything else after it, '
          f'e.g. optax.chain(ssj.{name}(...), optax.clip_by_global_norm(c), '
          'optax.add_decayed_weights(wd), optax.sgd(lr)).')


def bind_extra_args(transform: optax.GradientTransformation,
                    **extra_args: Any) -> optax.GradientTransformationExtraArgs:
  """Returns ``transform`` with keyword extra arguments fixed for ``update``.

  For wrappers that call ``update`` without extra arguments, e.g.
  ``optax.lookahead``. Build it inside the jitted step, where ``loss_fn`` and
  the batch are known; ``init`` ignores the bound arguments, so the state of a
  transformation built once without them fits.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sse_sam_jax as ssj
    >>> x, y = jnp.ones((4, 3)), jnp.arange(4.)
    >>> def make_tx(**bound):
    ...   fast = optax.chain(ssj.bind_extra_args(ssj.sam(0.05), **bound), optax.sgd(0.1))
    ...   return optax.lookahead(fast, sync_period=5, slow_step_size=0.5)
    >>> params = optax.LookaheadParams.init_synced(jnp.zeros(3))
    >>> state = make_tx().init(params)
    >>> loss_fn = lambda w: (x @ w - y) ** 2
    >>> grads = jax.grad(lambda w: loss_fn(w).mean())(params.fast)
    >>> updates, state = make_tx(loss_fn=loss_fn).update(grads, state, params)
  """
  transform = optax.with_extra_args_support(transform)

  def update_fn(updates, state, params=None, **call_args):
    return transform.update(updates, state, params, **{**extra_args, **call_args})

  return optax.GradientTransformationExtraArgs(transform.init, update_fn)
