"""The device mesh and how the train state and the batch lie on it.

One mesh axis, ``data``, spans every device of every host. The batch is split
along it. The train state is either **replicated** (every device holds all of
it) or **FSDP-style sharded**: every array of at least ``min_elements``
elements is split along its largest dimension that the device count divides,
so parameters and momentum at rest take ``1/n`` of the memory per device. The
compiler (GSPMD) then gathers the parameters for each forward/backward pass
and reduces the gradients onto the shards (XLA:CPU with an all-reduce and a
slice; see ``benchmarks/collectives.py``); the sharpness-aware perturbation
``w + rho g/||g||`` and the optimizer update run on the shards.

Example:

>>> fsdp_spec((3, 3, 64, 128), num_shards=8, min_elements=1024)  # a conv kernel
P(None, None, None, 'data')
>>> fsdp_spec((128,), num_shards=8, min_elements=1024)  # a bias: too small to split
P()
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'
PARAMETER_SHARDINGS = ('replicated', 'fsdp')


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (0: all, all hosts)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'asked for {n} devices, {len(devices)} available.')
  return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def fsdp_spec(shape, num_shards: int, min_elements: int) -> P:
  """The partition of one array: its largest dimension divisible by ``num_shards``
  (the first of equal ones) on ``data``; replicated when small or indivisible."""
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_elements:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_shards == 0:
      spec = [None] * len(shape)
      spec[dim] = AXIS
      return P(*spec)
  return P()


def state_sharding(tree, mesh: Mesh, parameter_sharding: str = 'replicated', *,
                   min_elements: int = 2 ** 14):
  """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
  if parameter_sharding not in PARAMETER_SHARDINGS:
    raise ValueError(f'parameter_sharding must be one of {PARAMETER_SHARDINGS}, '
                     f'got {parameter_sharding!r}.')
  n = mesh.shape[AXIS]
  if parameter_sharding == 'replicated':
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n, min_elements)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def bytes_per_device(tree) -> int:
  """Bytes of ``tree``'s arrays held by one device (its addressable shard of each)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard_shape = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard_shape, dtype=np.int64)) * x.dtype.itemsize
  return total
