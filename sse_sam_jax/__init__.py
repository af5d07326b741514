"""sse-sam-jax: SAM, ImbSAM and SSE-SAM for long-tailed training in JAX/Optax.

``import sse_sam_jax`` needs jax, optax and numpy only; the training system
(``sse_sam_jax.train``, ``.data``, ``.models``, ``.analysis``) needs the
``[train]`` extra: ``pip install 'sse-sam-jax[train]'``.
"""

from sse_sam_jax.optim import (
    ASAM_ETA, HEAD, TAIL, NORMALIZATIONS, SharpnessAwareState, SharpnessReuseState,
    SharpnessSteps, StageSwitchState, adaptive_leaves, asam, focal_sam, focal_weights, bind_extra_args, example_groups,
    group_coefficients, group_sam, imbsam, is_sharpness_step, looksam, mean_across,
    microbatched, perturb, random_fraction, resolve_mask, sam, sam_then_imbsam,
    sharpness_step_at, sharpness_steps_of, sse_sam, stage_at, stage_boundaries, stage_switch,
    switch_step, tail_classes, validate_class_counts, validate_radius)

__version__ = '0.3.0.dev0'

__all__ = [
    'ASAM_ETA',
    'HEAD',
    'NORMALIZATIONS',
    'TAIL',
    'SharpnessAwareState',
    'SharpnessReuseState',
    'SharpnessSteps',
    'StageSwitchState',
    'adaptive_leaves',
    'asam',
    'bind_extra_args',
    'example_groups',
    'focal_sam',
    'focal_weights',
    'group_coefficients',
    'group_sam',
    'imbsam',
    'is_sharpness_step',
    'looksam',
    'mean_across',
    'microbatched',
    'perturb',
    'random_fraction',
    'resolve_mask',
    'sam',
    'sam_then_imbsam',
    'sharpness_step_at',
    'sharpness_steps_of',
    'sse_sam',
    'stage_at',
    'stage_boundaries',
    'stage_switch',
    'switch_step',
    'tail_classes',
    'validate_class_counts',
    'validate_radius',
    '__version__',
]
