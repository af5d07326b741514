"""TFDS datasets through ``tfds.data_source`` (random access, no TensorFlow at run time):
CIFAR-10/100-LT held in memory, ImageNet-LT and iNaturalist 2018 read image by image.
tensorflow-datasets is the ``[tfds]`` extra; without it these fail in one line naming it."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from sse_sam_jax.data.sources import (
    DatasetNotPreparedError,
    LongTailData,
    Split,
    hold_out,
    make_long_tailed,
)


def _prepare_instructions(name: str, data_dir) -> str:
  where = f' --data_dir={data_dir}' if data_dir else ''
  manual = ''
  if name in ('imagenet2012', 'i_naturalist2018'):
    manual = (' This dataset needs its archives downloaded by hand first; put them in '
              '<data_dir>/downloads/manual and add --manual_dir=<that folder>.')
  return (f'TFDS dataset {name!r} is not prepared{" in " + str(data_dir) if data_dir else ""}. '
          f'Prepare it once, in array_record format (random access); building needs '
          f'TensorFlow, which the [prepare] extra installs:\n'
          f"  pip install 'sse-sam-jax[prepare]' && "
          f'tfds build {name}{where} --file_format=array_record\n'
          f'{manual} Then pass the same data_dir (config data.data_dir or $TFDS_DATA_DIR).')


def tfds_source(name: str, split: str, data_dir=None) -> Any:
  """``tfds.data_source`` with no download attempt; a clear error if not prepared, or if
  TFDS is not installed (the ``[tfds]`` extra)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} needs tensorflow-datasets, which the [tfds] extra installs: "
        f"pip install 'sse-sam-jax[tfds]' (the .npz and MNIST-1D data need nothing more)."
    ) from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types here; all mean "not usable as is"
    raise DatasetNotPreparedError(_prepare_instructions(name, data_dir) +
                                  f'\n(tfds said: {type(e).__name__}: {str(e)[:300]})') from e


def read_split(source, indices=None, image_key='image', label_key='label', num_classes=None,
               name='', transform=None) -> Split:
  """Reads items one by one (random access) into arrays.

  ``transform`` maps each image to a fixed shape (needed for ImageNet/iNaturalist,
  whose images vary in size), e.g. ``augment.center_crop_resize``.
  """
  indices = range(len(source)) if indices is None else indices
  xs, ys = [], []
  for i in indices:
    item = source[int(i)]
    image = np.asarray(item[image_key])
    xs.append(image if transform is None else transform(image))
    ys.append(int(item[label_key]))
  return Split(np.stack(xs), np.asarray(ys), num_classes or (max(ys) + 1), name)


TFDS_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000, 'i_naturalist2018': 8142}


def tfds_long_tail(name: str, imbalance_factor: float, *, data_dir=None, profile='exp',
                   selection='shuffle', seed=0, val_fraction=0.0) -> LongTailData:
  """CIFAR-10/100-LT (or any small TFDS classification set) as in LDAM-DRW."""
  num_classes = TFDS_CLASSES.get(name)
  train_src = tfds_source(name, 'train', data_dir)
  test_src = tfds_source(name, 'test', data_dir)
  train = read_split(train_src, num_classes=num_classes, name=name)
  train = make_long_tailed(train, imbalance_factor, profile=profile, selection=selection,
                           seed=seed)
  train, val = hold_out(train, val_fraction, seed)
  test = read_split(test_src, num_classes=train.num_classes, name=name + '-test')
  return LongTailData(train, test, val, name)


def read_split_list(path) -> tuple[list[str], np.ndarray]:
  """An ImageNet-LT style list file: ``<relative/path/name.JPEG> <label>`` per line."""
  names, labels = [], []
  for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.strip().rsplit(None, 1)  # the label is the last token; paths may hold spaces
    if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
      raise ValueError(f'{path}:{n}: expected "<image path> <label>", got {line!r}.')
    names.append(pathlib.PurePosixPath(parts[0]).name)
    labels.append(int(parts[1]))
  return names, np.asarray(labels, np.int64)


def indices_for_list(source, file_names, file_key='file_name') -> np.ndarray:
  """Positions in a TFDS source of the images a split list names; errors on unknown ones."""
  position = {}
  for i in range(len(source)):
    key = source[i][file_key]
    key = key.decode() if isinstance(key, bytes) else str(key)
    position[pathlib.PurePosixPath(key).name] = i
  missing = [f for f in file_names if f not in position]
  if missing:
    raise ValueError(f'{len(missing)} images in the split list are not in the dataset, '
                     f'e.g. {missing[:3]}.')
  return np.asarray([position[f] for f in file_names])


class LazyImages:
  """Images read on demand from a random-access source (ImageNet-LT, iNaturalist).

  Stands in for ``Split.x``: ``gather(ids, rng)`` decodes the images at positions
  ``ids`` and returns a float32 batch ``[len(ids), size, size, 3]``: with ``rng``
  random-resized-crop + flip (training), without it a centre crop (evaluation).
  Nothing is held in memory but the index.
  """

  def __init__(self, source, indices, size: int = 224, image_key: str = 'image'):
    self.source, self.indices = source, np.asarray(indices)
    self.size, self.image_key = size, image_key

  def __len__(self):
    return len(self.indices)

  @property
  def shape(self):
    return (len(self), self.size, self.size, 3)

  def gather(self, ids, rng=None) -> np.ndarray:
    from sse_sam_jax.data import augment
    out = []
    for i in np.atleast_1d(ids):
      image = np.asarray(self.source[int(self.indices[int(i)])][self.image_key])
      if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
      out.append(augment.random_resized_crop_flip(image, rng, self.size) if rng is not None
                 else augment.center_crop_resize(image, self.size))
    return augment.normalize_images(np.stack(out), augment.IMAGENET_MEAN, augment.IMAGENET_STD)

  def __getitem__(self, ids):
    if isinstance(ids, slice):
      ids = np.arange(len(self))[ids]
    return self.gather(ids)

  def take_rows(self, rows) -> LazyImages:
    """The images at positions ``rows``, still unread (``Split.subset`` calls it)."""
    return LazyImages(self.source, self.indices[rows], self.size, self.image_key)


def imagenet_lt(train_list, test_list, *, data_dir=None, size=224, val_fraction=0.0,
                seed=0) -> LongTailData:
  """ImageNet-LT: TFDS ``imagenet2012`` (prepared by the user) + the standard split lists.

  ``train_list``/``test_list`` are the ``ImageNet_LT_train.txt`` / ``ImageNet_LT_test.txt``
  files (``<path> <label>`` per line); images are matched by file name to TFDS's
  ``file_name`` (train list -> TFDS train split, test list -> TFDS validation split).
  """
  lists = {'train': train_list, 'validation': test_list}
  splits = {}
  for tfds_split, path in lists.items():
    source = tfds_source('imagenet2012', tfds_split, data_dir)
    names, labels = read_split_list(path)
    idx = indices_for_list(source, names)
    splits[tfds_split] = Split(LazyImages(source, idx, size), labels, 1000,
                               f'imagenet_lt-{tfds_split}')
  train, val = hold_out(splits['train'], val_fraction, seed)
  return LongTailData(train, splits['validation'], val, 'imagenet_lt')


def inaturalist2018(*, data_dir=None, size=224, val_fraction=0.0, seed=0) -> LongTailData:
  """iNaturalist 2018 (naturally long-tailed; TFDS ``i_naturalist2018``): train and the
  official validation split as test. Labels are read once from the source."""
  out = {}
  for tfds_split in ('train', 'validation'):
    source = tfds_source('i_naturalist2018', tfds_split, data_dir)
    labels = np.asarray([int(source[i]['label']) for i in range(len(source))])
    out[tfds_split] = Split(LazyImages(source, np.arange(len(source)), size), labels, 8142,
                            f'inat2018-{tfds_split}')
  train, val = hold_out(out['train'], val_fraction, seed)
  return LongTailData(train, out['validation'], val, 'i_naturalist2018')


