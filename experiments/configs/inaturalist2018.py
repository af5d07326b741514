"""iNaturalist 2018 (8,142 classes, naturally long-tailed) with ResNet-50 and SSE-SAM
(GPU/TPU). Same common recipe as imagenet_lt.py, not one given in shared/method.md.

  tfds build i_naturalist2018 --file_format=array_record
  sse-sam-jax train --config experiments/configs/inaturalist2018.py
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    'imagenet_lt', pathlib.Path(__file__).with_name('imagenet_lt.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  c = _base.get_config()
  c.data.name = 'inaturalist2018'
  c.data.train_list = ''
  c.data.test_list = ''
  return c
