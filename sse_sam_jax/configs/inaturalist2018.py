"""iNaturalist 2018 (8,142 classes, naturally long-tailed) with ResNet-50 and SSE-SAM
(GPU/TPU). Same common recipe as imagenet_lt.py, not one given in shared/method.md.

  tfds build i_naturalist2018 --file_format=array_record
  sse-sam-jax train --config inaturalist2018
"""

from sse_sam_jax.configs import imagenet_lt


def get_config():
  c = imagenet_lt.get_config()
  c.data.name = 'inaturalist2018'
  c.data.train_list = ''
  c.data.test_list = ''
  return c
