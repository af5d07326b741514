"""The offline long-tailed benchmark (setting B): MNIST-1D-LT, IF 100, noise 0.07, SSE-SAM.

  sse-sam-jax train --config mnist1d_lt --workdir runs/mnist1d_lt
Setting A (saturated): add data.iid_noise_scale=0.02.
"""

from sse_sam_jax.train.config import default_config


def get_config():
  return default_config()
