"""Generated data (MNIST-1D) goes to a cache of the test run, not the user's ~/.cache."""

import os
import tempfile

os.environ.setdefault('SSE_SAM_JAX_CACHE', os.path.join(tempfile.gettempdir(),
                                                        f'sse_sam_jax_test_cache_{os.getuid()}'))
