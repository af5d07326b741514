"""Long-tailed data: profiles, exact counts, TFDS mock sources, errors, pipeline determinism."""


import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sse_sam_jax import data
from sse_sam_jax.data import augment, profiles, sources, tfds_sources


def test_exact_lt_counts():
  c10 = profiles.long_tail_counts(5000, 10, 100)
  assert c10 == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  assert sum(c10) == 12406
  assert sum(profiles.long_tail_counts(500, 100, 100)) == 10847
  assert profiles.long_tail_counts(100, 4, 10, 'step') == [100, 100, 10, 10]
  assert profiles.long_tail_counts(100, 3, 1) == [100, 100, 100]


@pytest.mark.parametrize('bad', [0.5, 0.0, -3])
def test_imbalance_factor_below_one(bad):
  with pytest.raises(ValueError, match='imbalance factor must be >= 1'):
    profiles.long_tail_counts(100, 10, bad)


def test_select_long_tail_ldam_rule():
  labels = np.repeat(np.arange(3), 10)
  idx = profiles.select_long_tail(labels, [10, 5, 2], seed=0)
  rng = np.random.RandomState(0)
  want = []
  for c, n in enumerate([10, 5, 2]):
    ids = np.flatnonzero(labels == c)
    rng.shuffle(ids)
    want.append(ids[:n])
  np.testing.assert_array_equal(idx, np.concatenate(want))
  first = profiles.select_long_tail(labels, [10, 5, 2], selection='first')
  np.testing.assert_array_equal(first, np.r_[0:10, 10:15, 20:22])
  with pytest.raises(ValueError, match='fewer than'):
    profiles.select_long_tail(labels, [11, 5, 2])


def test_class_stats_groups_and_errors():
  stats = data.ClassStats(np.array([5000, 900, 150, 50]), many_above=1000, few_below=200)
  g = stats.shot_groups()
  assert g['many'].tolist() == [True, False, False, False]
  assert g['medium'].tolist() == [False, True, False, False]
  assert g['few'].tolist() == [False, False, True, True]
  assert stats.class_groups(1000).tolist() == [0, 1, 1, 1]
  with pytest.raises(ValueError, match='no tail'):
    stats.class_groups(10)
  with pytest.raises(ValueError, match='no head'):
    stats.class_groups(10**6)
  with pytest.raises(ValueError, match='no training example'):
    data.ClassStats.from_labels([0, 0, 2], 3)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
    data.ClassStats.from_labels([0, 1, 3], 3)


def test_split_validates_labels():
  with pytest.raises(ValueError, match='labels must lie'):
    data.Split(np.zeros((3, 2)), np.array([0, 1, 5]), 3, 'x')
  with pytest.raises(ValueError, match='empty'):
    data.Split(np.zeros((0, 2)), np.array([], np.int64), 3, 'x')


@pytest.mark.parametrize('name,classes', [('cifar10', 10), ('cifar100', 100)])
def test_tfds_cifar_lt_with_mock_data(name, classes):
  n = 40 * classes
  with tfds.testing.mock_data(num_examples=n):
    lt = tfds_sources.tfds_long_tail(name, imbalance_factor=10, val_fraction=0.0)
  counts = np.bincount(lt.train.label, minlength=classes)
  full_min = counts[0]  # n_max = the smallest class of the balanced mock train split
  assert counts.tolist() == profiles.long_tail_counts(full_min, classes, 10)
  assert lt.train.x.shape[1:] == (32, 32, 3) and lt.test.x.shape[1:] == (32, 32, 3)
  assert len(lt.test) == n


def test_mock_imagenet_and_inaturalist_sources():
  with tfds.testing.mock_data(num_examples=12):
    inet = tfds_sources.tfds_source('imagenet2012', 'train')
    names = [pathlib_name(inet[i]['file_name']) for i in range(len(inet))]
    inat = tfds_sources.tfds_source('i_naturalist2018', 'train')
    split = tfds_sources.read_split(inat, range(5), num_classes=8142, name='inat',
                               transform=lambda im: augment.center_crop_resize(im, 16))
  assert split.x.shape == (5, 16, 16, 3) and split.x.dtype == np.uint8
  assert len(names) == 12 and all(isinstance(n, str) and n for n in names)
  assert split.label.shape == (5,) and np.all((split.label >= 0) & (split.label < 8142))


def pathlib_name(x):
  import pathlib
  return pathlib.PurePosixPath(x.decode() if isinstance(x, bytes) else str(x)).name


def test_imagenet_lt_split_list(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    src = tfds_sources.tfds_source('imagenet2012', 'train')
    # (mock names are random strings; real ImageNet names have no edge whitespace)
    files = [f for f in (pathlib_name(src[i]['file_name']) for i in range(len(src)))
             if f == f.strip()]
    # a synthetic ImageNet-LT list naming images of the mock split
    lst = tmp_path / 'ImageNet_LT_train.txt'
    lst.write_text(''.join(f'train/n0/{f} {i % 3}\n' for i, f in enumerate(files[:4])))
    names, labels = tfds_sources.read_split_list(lst)
    idx = tfds_sources.indices_for_list(src, names)
    assert [pathlib_name(src[int(i)]['file_name']) for i in idx] == names
    assert labels.tolist() == [0, 1, 2, 0]
    bad = tmp_path / 'bad.txt'
    bad.write_text('train/n0/unknown_image.JPEG 1\n')
    with pytest.raises(ValueError, match='not in the dataset'):
      tfds_sources.indices_for_list(src, tfds_sources.read_split_list(bad)[0])
  malformed = tmp_path / 'm.txt'
  malformed.write_text('only_a_name\n')
  with pytest.raises(ValueError, match='expected'):
    tfds_sources.read_split_list(malformed)


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
  with pytest.raises(sources.DatasetNotPreparedError, match='tfds build cifar10'):
    tfds_sources.tfds_source('cifar10', 'train', data_dir=str(tmp_path))
  with pytest.raises(sources.DatasetNotPreparedError, match='manual_dir'):
    tfds_sources.tfds_source('imagenet2012', 'train', data_dir=str(tmp_path))


def test_npz_bring_your_own(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'mine.npz'
  np.savez(path, x=rng.normal(size=(600, 8)).astype(np.float32), y=np.repeat(np.arange(3), 200))
  lt = sources.npz_long_tail(path, imbalance_factor=10, val_fraction=0.1)
  counts = np.bincount(lt.train.label) + np.bincount(lt.val.label)
  assert counts.tolist() == profiles.long_tail_counts(160, 3, 10)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    sources.npz_long_tail(tmp_path / 'missing.npz')
  np.savez(tmp_path / 'bad.npz', x=np.zeros((4, 2)), y=np.array([0, 1, -1, 2]))
  with pytest.raises(ValueError, match='labels must be >= 0; found -1'):
    sources.npz_long_tail(tmp_path / 'bad.npz', num_classes=3)


def test_mnist1d_offline_benchmark_small():
  lt = sources.mnist1d_long_tail(num_samples=4000, n_max=300, imbalance_factor=10)
  assert np.bincount(lt.train.label).tolist() == profiles.long_tail_counts(300, 10, 10)
  assert lt.train.x.shape[1] == 40
  again = sources.mnist1d_long_tail(num_samples=4000, n_max=300, imbalance_factor=10)
  np.testing.assert_array_equal(lt.train.x, again.train.x)
  assert abs(float(lt.train.x.mean())) < 1e-4


def test_mnist1d_generated_validation_split_is_balanced_and_new():
  lt = sources.mnist1d_long_tail(num_samples=4000, n_max=300, imbalance_factor=10,
                                 val_generated=2000, val_seed=7)
  counts = np.bincount(lt.val.label, minlength=10)
  assert len(lt.val) == 2000 and counts.min() > 150  # about a tenth per class
  assert lt.val.x.shape[1:] == lt.train.x.shape[1:] and lt.val.x.dtype == np.float32
  # another draw of the generator: no validation input repeats a training input
  train_rows = {row.tobytes() for row in lt.train.x}
  assert not any(row.tobytes() in train_rows for row in lt.val.x)
  # standardised with the training set's statistics, as the test split
  plain = sources.mnist1d_long_tail(num_samples=4000, n_max=300, imbalance_factor=10)
  np.testing.assert_array_equal(plain.train.x, lt.train.x)
  np.testing.assert_array_equal(plain.test.x, lt.test.x)
  with pytest.raises(ValueError, match='choose one validation split'):
    sources.mnist1d_long_tail(num_samples=4000, n_max=300, val_generated=100, val_fraction=0.1)
  with pytest.raises(ValueError, match='would repeat the training examples'):
    sources.mnist1d_long_tail(num_samples=4000, n_max=300, val_generated=100, val_seed=42)


def test_mnist1d_generated_once_then_loaded_from_the_disk_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('SSE_SAM_JAX_CACHE', str(tmp_path))
  args = (1200, 3, 0.07)
  sources._mnist1d_raw.cache_clear()
  fresh = sources._mnist1d_raw(*args)
  [cached] = list(tmp_path.glob('mnist1d-*-n1200-seed3-noise0.07.npz'))
  sources._mnist1d_raw.cache_clear()
  loaded = sources._mnist1d_raw(*args)
  for k in sources.MNIST1D_KEYS:
    np.testing.assert_array_equal(fresh[k], loaded[k])
  # a damaged file (an interrupted copy) is generated again, the same
  cached.write_bytes(cached.read_bytes()[:100])
  sources._mnist1d_raw.cache_clear()
  again = sources._mnist1d_raw(*args)
  np.testing.assert_array_equal(fresh['x_test'], again['x_test'])
  assert len(cached.read_bytes()) > 1000
  # an unwritable cache costs the cache only
  monkeypatch.setenv('SSE_SAM_JAX_CACHE', '/proc/no_such_dir')
  sources._mnist1d_raw.cache_clear()
  np.testing.assert_array_equal(fresh['y'], sources._mnist1d_raw(*args)['y'])
  sources._mnist1d_raw.cache_clear()


def _split(n=300, shape=(8, 8, 3)):
  rng = np.random.default_rng(0)
  return data.Split(rng.integers(0, 255, (n,) + shape).astype(np.uint8), rng.integers(0, 5, n),
                    5, 't')


def test_pipeline_same_seed_same_batches_and_exact_resume():
  split = _split()
  spec = data.BatchSpec(64)
  ds = data.train_batches(split, spec, num_epochs=3, seed=7, augment=augment.pad_crop_flip)
  it = iter(ds)
  first = [next(it) for _ in range(7)]  # crosses an epoch (5 steps/epoch)
  assert [b['x'].shape[0] for b in first] == [64, 64, 64, 64, 44, 64, 64]
  state = it.get_state()
  rest = [next(it) for _ in range(4)]
  it2 = iter(data.train_batches(split, spec, num_epochs=3, seed=7, augment=augment.pad_crop_flip))
  same = [next(it2) for _ in range(7)]
  for a, b in zip(first, same):
    np.testing.assert_array_equal(a['x'], b['x'])
  it3 = iter(ds)
  it3.set_state(state)
  for a, b in zip(rest, [next(it3) for _ in range(4)]):
    np.testing.assert_array_equal(a['x'], b['x'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # every example exactly once per epoch
  epoch0 = np.concatenate([b['label'] for b in first[:5]])
  assert np.bincount(epoch0, minlength=5).tolist() == np.bincount(split.label, minlength=5).tolist()
  other = next(iter(data.train_batches(split, spec, num_epochs=1, seed=8)))
  assert not np.array_equal(other['label'], first[0]['label'])


class _CountingImages:
  """Lazily read images (as the ImageNet/iNaturalist sources): counts the batches made."""

  def __init__(self, n):
    self.n, self.made, self.lock = n, 0, threading.Lock()

  def __len__(self):
    return self.n

  def gather(self, ids, rng=None):
    del rng
    with self.lock:
      self.made += 1
    return np.zeros((len(ids), 4), np.float32)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_pipeline_reads_only_prefetch_batches_ahead(prefetch):
  """A batch of ImageNet images is 154 MB: the pipeline makes ``prefetch_batches`` of them
  ahead of the loop, not grain's default 500 (which, one batch in, held 740 MB of CIFAR
  batches); the batches are the same for any read-ahead."""
  images = _CountingImages(64 * 40)
  split = data.Split(images, np.arange(64 * 40) % 5, 5)
  it = iter(data.train_batches(split, data.BatchSpec(64), num_epochs=1, seed=0,
                               prefetch_batches=prefetch))
  first = next(it)
  deadline = time.monotonic() + 10  # the read-ahead happens (a loaded machine: slowly)
  while images.made < prefetch and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.3)  # and stops: grain's default had made all 40 batches by now
  assert prefetch <= images.made <= 1 + prefetch
  eager = next(iter(data.train_batches(split, data.BatchSpec(64), num_epochs=1, seed=0,
                                       prefetch_batches=0)))
  np.testing.assert_array_equal(first['label'], eager['label'])


def test_pipeline_host_sharding():
  split = _split()
  spec = data.BatchSpec(64, drop_remainder=True)
  full = next(iter(data.train_batches(split, spec, num_epochs=1, seed=1)))
  parts = [next(iter(data.train_batches(split, spec, num_epochs=1, seed=1, process_index=i,
                                        process_count=4))) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), full['label'])


def test_augment_shapes_and_flip():
  x = np.arange(2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
  flipped = augment.hflip(x)
  for j in range(4):  # column j of the flip is column 3 - j of the image
    np.testing.assert_array_equal(flipped[:, :, j], x[:, :, 3 - j])
  np.testing.assert_array_equal(augment.hflip(x[:, 0, :, 0]), x[:, 0, ::-1, 0])  # sequences
  # every augmented image is one of the 9 crops of the padded image, flipped or not,
  # and over many draws all 18 occur
  many = np.repeat(x[:1], 400, axis=0)
  y = augment.pad_crop_flip(many, np.random.default_rng(0), pad=1)
  assert y.shape == many.shape
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  crops = {}
  for dy in range(3):
    for dx in range(3):
      crop = padded[dy:dy + 4, dx:dx + 4]
      crops[(dy, dx, False)] = crop
      crops[(dy, dx, True)] = crop[:, ::-1]
  seen = set()
  for img in y:
    match = [k for k, crop in crops.items() if np.array_equal(img, crop)]
    assert match, img[..., 0]
    seen.update(match)
  assert len(seen) == 18
  img = np.zeros((40, 50, 3), np.uint8)
  assert augment.random_resized_crop_flip(img, np.random.default_rng(0), 16).shape == (16, 16, 3)
  assert augment.center_crop_resize(img, 16).shape == (16, 16, 3)


def test_imagenet_lt_lazy_pipeline_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    files = {}
    for split in ('train', 'validation'):
      src = tfds_sources.tfds_source('imagenet2012', split)
      files[split] = [f for f in (pathlib_name(src[i]['file_name']) for i in range(len(src)))
                      if f == f.strip()]
    train_list, test_list = tmp_path / 'ImageNet_LT_train.txt', tmp_path / 'ImageNet_LT_test.txt'
    train_list.write_text(''.join(f'train/n/{f} {i % 3}\n' for i, f in enumerate(files['train'])))
    test_list.write_text(''.join(f'val/{f} {i % 3}\n' for i, f in enumerate(files['validation'])))
    lt = tfds_sources.imagenet_lt(train_list, test_list, size=24)
    assert isinstance(lt.train.x, tfds_sources.LazyImages)
    assert len(lt.train) == len(files['train']) and lt.train.x.shape[1:] == (24, 24, 3)
    it = iter(data.train_batches(lt.train, data.BatchSpec(4, drop_remainder=True), num_epochs=1,
                                 seed=0, augment=augment.pad_crop_flip))
    b = next(it)
    assert b['x'].shape == (4, 24, 24, 3) and b['x'].dtype == np.float32
    again = next(iter(data.train_batches(lt.train, data.BatchSpec(4, drop_remainder=True),
                                         num_epochs=1, seed=0, augment=augment.pad_crop_flip)))
    np.testing.assert_array_equal(b['x'], again['x'])
    assert lt.test.x[0:3].shape == (3, 24, 24, 3)  # deterministic eval reads


def test_inaturalist_lazy_source_with_mock_data():
  with tfds.testing.mock_data(num_examples=6):
    lt = tfds_sources.inaturalist2018(size=16)
    assert len(lt.train) == 6 and lt.train.num_classes == 8142
    assert lt.train.x.gather([0, 1], np.random.default_rng(0)).shape == (2, 16, 16, 3)


def test_class_stats_check_labels_and_classes_at_their_limits():
  """``ClassStats`` at each boundary, with the messages a user reads."""
  from sse_sam_jax.data import ClassStats
  ok = ClassStats.from_labels([0, 1, 2, 2], 3)  # 0 and num_classes - 1 are valid labels
  assert ok.counts.tolist() == [1, 1, 2] and isinstance(ok.counts, np.ndarray)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\); found 0\.\.3\.'):
    ClassStats.from_labels([0, 1, 2, 3], 3)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\); found -1\.\.2\.'):
    ClassStats.from_labels([-1, 1, 2], 3)
  # the last class absent: counted (minlength), then refused by name
  with pytest.raises(ValueError, match=r'classes \[2\] \(1 of 3\) have no training example'):
    ClassStats.from_labels([0, 1, 1], 3)
  with pytest.raises(ValueError, match='positive'):
    ClassStats(counts=np.array([3, 0]))
  stats = ClassStats(counts=[9, 5, 5])
  assert stats.counts.dtype.kind == 'i' and stats.num_classes == 3
  with pytest.raises(ValueError, match=r'eta=5 leaves no tail class \(class counts range '
                                       r'5\.\.9\)'):
    stats.class_groups(5)  # tail: fewer than eta
  with pytest.raises(ValueError, match=r'eta=10 leaves no head class'):
    stats.class_groups(10)
  assert stats.class_groups(6).tolist() == [0, 1, 1]
  assert stats.class_groups(6).dtype == np.int32


def test_class_stats_from_labels_keeps_its_shot_thresholds():
  from sse_sam_jax.data import ClassStats
  stats = ClassStats.from_labels([0] * 6 + [1] * 3 + [2], 3, many_above=5, few_below=2)
  assert (stats.many_above, stats.few_below) == (5, 2)
  assert {k: v.tolist() for k, v in stats.shot_groups().items()} == {
      'many': [True, False, False], 'medium': [False, True, False], 'few': [False, False, True]}
