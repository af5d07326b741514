"""Augmentation on the device: the training images held on every device, batches made there.

With ``data.augment_on`` at ``'device'`` (or ``'auto'`` for in-memory images up to
:data:`MAX_BYTES`) the grain pipeline makes no images: each batch carries the examples'
indices and the augmentation's random draws (the same draws, from the same generator, as
the host's augmentation; :func:`~sse_sam_jax.data.augment.pad_crop_flip_draws`). A small
compiled program gathers the images from the copy every device holds and applies the
draws (:func:`~sse_sam_jax.data.augment.pad_crop_flip_on_device`), giving the train step
the batch the host would have made, bit for bit. Per step the host then draws a few
hundred integers and sends them, instead of cropping, copying (from worker processes)
and sending every image: CIFAR's 64 float32 images are 786 KB, their indices and draws
1.1 KB with the labels and the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sse_sam_jax.data import augment as augment_lib

AUGMENT_ON = ('auto', 'host', 'device')
MAX_BYTES = 2 << 30  # 'auto': training images up to this size go on every device
DRAWS = {'dy': np.int32, 'dx': np.int32, 'flip': np.bool_}  # pad_crop_flip_draws' arrays


def on_device(augment_on: str, augment: bool, images) -> bool:
  """Whether a run augments on the device: ``augment_on='device'`` (in-memory images
  ``[N, H, W, C]`` required, ``ValueError`` otherwise), or ``'auto'`` with such images of
  at most :data:`MAX_BYTES`; never without augmentation or with ``'host'``."""
  if augment_on not in AUGMENT_ON:
    raise ValueError(f'data.augment_on must be one of {AUGMENT_ON}, got {augment_on!r}.')
  if not augment or augment_on == 'host':
    return False
  in_memory = isinstance(images, np.ndarray) and images.ndim == 4
  if augment_on == 'device' and not in_memory:
    raise ValueError("data.augment_on='device' needs the training images in memory as "
                     f'[N, H, W, C] (got {type(images).__name__} of shape '
                     f"{list(getattr(images, 'shape', []))}); use 'host' or 'auto'.")
  return in_memory and (augment_on == 'device' or images.nbytes <= MAX_BYTES)


class DeviceImages:
  """The training images replicated over ``mesh``, in their stored dtype (uint8 images
  stay uint8 there), and the programs that make batches from them.

  Called with a dispatch's batch on the devices (``'ids'``, the draws, ``'label'`` and
  ``'mask'`` where padded; one step ``[B]`` or ``n`` steps ``[n, B]``), it returns the
  train step's batch: ``'x'`` in ``input_dtype``, sharded as the labels are, padded rows
  zero (as :func:`sse_sam_jax.train.dispatch.pad` makes them on the host), with
  ``'label'`` (and ``'mask'``). One program per batch shape, built by :meth:`precompile`
  or on first use.
  """

  def __init__(self, images: np.ndarray, mesh, input_dtype, pad: int = 4):
    self.input_dtype, self.pad = np.dtype(input_dtype), int(pad)
    replicated = NamedSharding(mesh, P())
    self.images = jax.make_array_from_callback(images.shape, replicated,
                                               lambda index: images[index])
    self.compiles = 0
    self._executables = {}

  @property
  def nbytes(self) -> int:
    """The bytes every device holds."""
    return int(self.images.nbytes)

  def _make(self, images, batch):
    x = augment_lib.pad_crop_flip_on_device(images, batch['ids'], batch['dy'], batch['dx'],
                                            batch['flip'], self.pad).astype(self.input_dtype)
    out = {'x': x, 'label': batch['label']}
    if 'mask' in batch:
      out['x'] = jnp.where(batch['mask'][..., None, None, None], x, jnp.zeros_like(x))
      out['mask'] = batch['mask']
    return out

  @staticmethod
  def _key(batch):
    return tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))

  def _executable(self, batch):
    key = self._key(batch)
    if key not in self._executables:
      sharding = batch['label'].sharding
      self._executables[key] = jax.jit(self._make, out_shardings=sharding).lower(
          self.images, batch).compile()
      self.compiles += 1
    return self._executables[key]

  def precompile(self, batch_specs) -> None:
    """Builds the program of every train step batch spec (``{'x', 'label'[, 'mask']}``
    of :func:`sse_sam_jax.train.dispatch.programs`)."""
    for spec in batch_specs:
      label = spec['label']
      self._executable(dict(
          {k: jax.ShapeDtypeStruct(label.shape, d, sharding=label.sharding)
           for k, d in (('ids', np.int32), *DRAWS.items())},
          **{k: v for k, v in spec.items() if k != 'x'}))

  def __call__(self, batch: dict) -> dict:
    return self._executable(batch)(self.images, batch)
