"""Configs shipped with the package, selectable by name: ``--config cifar100_lt_ssesam``.

Each module has ``get_config()`` returning an ``ml_collections.ConfigDict`` (the
defaults of :func:`sse_sam_jax.train.config.default_config` with a recipe's
changes). A path to any such ``.py`` file works too.
"""

import pathlib

NAMES = tuple(sorted(p.stem for p in pathlib.Path(__file__).parent.glob('*.py')
                     if not p.stem.startswith('_')))
