"""Every golden trajectory reproduced parameter by parameter, every step, float64."""

import jax
import numpy as np
import pytest

from tests import golden_cases

RTOL = 1e-12


def _max_rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))) if a.size else 0.0


def _run(name, share_clean_pass, jit, steps=None):
  meta, arrays = golden_cases.load(name)
  with golden_cases.enable_x64():
    tx = golden_cases.optimizer(meta)
    params = golden_cases.params_at(arrays, 0)
    opt_state = tx.init(params)
    step = golden_cases.make_step(tx, share_clean_pass)
    if jit:
      step = jax.jit(step)
    for s in range(steps or meta['steps']):
      params, opt_state = step(params, opt_state, arrays['x'][s], arrays['y'][s])
      expected = golden_cases.params_at(arrays, s + 1)
      for k, want in expected.items():
        assert params[k].dtype == np.float64
        np.testing.assert_allclose(
            params[k], want, rtol=RTOL, atol=1e-14,
            err_msg=f'{name}: {k} differs after step {s}')
        # Relative error of the whole tensor, so tiny entries are not excused by atol.
        denom = np.max(np.abs(want))
        assert np.max(np.abs(np.asarray(params[k]) - want)) <= RTOL * denom, (name, k, s)


@pytest.mark.parametrize('name', golden_cases.CASES)
def test_golden(name):
  _run(name, share_clean_pass=True, jit=True)


@pytest.mark.parametrize('name', golden_cases.CASES)
def test_golden_without_shared_clean_pass_eager(name):
  """Op by op, the first 5 of the 8 steps: SSE-SAM's cases switch stage at step 4 (each
  eager step compiles its ops again, ~1.5 s a step on XLA:CPU)."""
  meta, _ = golden_cases.load(name)
  assert meta.get('switch_step', 4) <= 4
  _run(name, share_clean_pass=False, jit=False, steps=5)


def test_all_golden_cases_present():
  assert set(golden_cases.CASES) == {
      'mlp_sgd', 'mlp_sam', 'mlp_imbsam_group', 'mlp_imbsam_batch', 'mlp_ssesam',
      'mlpbn_ssesam'}
