"""Long-tailed data: profiles, class statistics, sources and the grain pipeline."""

from sse_sam_jax.data.pipeline import (
    BatchSpec,
    check_batch_order,
    eval_batches,
    load_batch_order,
    train_batches,
    wait_for_shared_memory_release,
)
from sse_sam_jax.data.profiles import long_tail_counts, select_long_tail
from sse_sam_jax.data.sources import (
    DatasetNotPreparedError,
    LongTailData,
    Split,
    hold_out,
    make_long_tailed,
    mnist1d_long_tail,
    npz_long_tail,
)
from sse_sam_jax.data.stats import SHOT_THRESHOLDS, ClassStats
from sse_sam_jax.data.tfds_sources import (
    LazyImages,
    imagenet_lt,
    inaturalist2018,
    tfds_long_tail,
    tfds_source,
)

__all__ = [
    'BatchSpec',
    'ClassStats',
    'DatasetNotPreparedError',
    'LazyImages',
    'LongTailData',
    'SHOT_THRESHOLDS',
    'Split',
    'check_batch_order',
    'eval_batches',
    'hold_out',
    'imagenet_lt',
    'inaturalist2018',
    'load_batch_order',
    'long_tail_counts',
    'make_long_tailed',
    'mnist1d_long_tail',
    'npz_long_tail',
    'select_long_tail',
    'tfds_long_tail',
    'tfds_source',
    'train_batches',
    'wait_for_shared_memory_release',
]
