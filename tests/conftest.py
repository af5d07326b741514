"""Generated data (MNIST-1D) goes to a cache of the test run, not the user's ~/.cache."""

import os
import tempfile

os.environ.setdefault('SSE_SAM_JAX_CACHE', os.path.join(tempfile.gettempdir(),
                                                        f'sse_sam_jax_test_cache_{os.getuid()}'))


def pytest_collection_modifyitems(config, items):
  """The ``slow`` tests (multi-device subprocesses, a minute or two each) run first, so
  that under ``pytest -n 2`` the short tests fill in around them instead of one worker
  idling while the other finishes a long test at the end."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
