"""The loop's throughput machinery changes nothing it trains: several steps per dispatch,
and the dispatch plan around epochs, stage switches and resumes."""

import jax
import numpy as np
import pytest

from sse_sam_jax.train import trainer
from tests.test_trainer import make_npz, small_config


def test_dispatch_plan_keeps_chunks_inside_an_epoch_and_a_stage():
  # 8 steps per epoch, 7 full batches (the 8th partial), a stage switch at step 20
  plan = trainer.DispatchPlan(4, steps_per_epoch=8, full_batches=7, boundaries=[20])
  dispatches = plan.dispatches(0, 32)
  assert sum(n for _, n in dispatches) == 32
  assert [s for s, n in dispatches if n > 1] == [0, 8, 16, 24]
  for start, n in dispatches:
    steps = range(start, start + n)
    assert len({s // 8 for s in steps}) == 1  # one epoch
    assert len({s >= 20 for s in steps}) == 1  # one stage
    assert n == 1 or all(s % 8 < 7 for s in steps)  # the partial batch alone
  # a resume at step 10 runs single steps up to the next chunk of its epoch (none here:
  # 12..15 would hold the partial batch); at 17 it waits for the next epoch
  assert [n for _, n in plan.dispatches(10, 16)] == [1] * 6
  assert plan.dispatches(17, 28)[:8] == [(s, 1) for s in range(17, 24)] + [(24, 4)]
  assert plan.steps_from(0, stop=3) == 1  # a stop inside the chunk splits it
  assert trainer.DispatchPlan(1, 8, 7, []).dispatches(0, 3) == [(0, 1), (1, 1), (2, 1)]


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return make_npz(tmp_path_factory.mktemp('data') / 'blobs.npz')


def _config(npz, k):
  # 226 examples, batch 32: 8 steps per epoch (7 full); the switch at epoch 2
  return small_config(npz, **{'epochs': 3, 'optimizer.name': 'sse_sam',
                              'optimizer.gamma': 0.5, 'steps_per_dispatch': k})


def test_several_steps_per_dispatch_train_the_same_and_resume_bit_identically(npz, tmp_path):
  one = trainer.train(_config(npz, 1), tmp_path / 'one', progress=False)
  four = trainer.train(_config(npz, 4), tmp_path / 'four', progress=False)
  # stopped at step 5 (inside a chunk's reach), resumed: single steps to the epoch's end
  trainer.train(_config(npz, 4), tmp_path / 'resumed', progress=False, stop_after_steps=5)
  resumed = trainer.train(_config(npz, 4), tmp_path / 'resumed', progress=False)
  # the resumed run dispatches the same steps together: bit-identical
  jax.tree.map(np.testing.assert_array_equal, four['state'], resumed['state'])
  assert resumed['test'] == four['test']
  # one program of 4 steps fuses differently from 4 programs: the same to float rounding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               one['state'], four['state'])
  assert abs(four['test']['all'] - one['test']['all']) <= 1 / 64
  # per stage: the 4-step chunk, the single full step, the partial batch
  assert one['compiles'] == 4 and four['compiles'] == 6
  assert four['timing']['steps'] == one['timing']['steps'] == 24
