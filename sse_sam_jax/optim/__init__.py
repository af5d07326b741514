"""Sharpness-aware optax transformations for long-tailed training (jax + optax only)."""

from sse_sam_jax.optim.accumulation import microbatched
from sse_sam_jax.optim.composition import bind_extra_args, check_composition
from sse_sam_jax.optim.cross_device import mean_across
from sse_sam_jax.optim.focal import focal_sam, focal_weights
from sse_sam_jax.optim.group_methods import group_coefficients, group_sam, imbsam
from sse_sam_jax.optim.grouping import (
    HEAD,
    TAIL,
    example_groups,
    tail_classes,
    validate_class_counts,
    validate_labels,
)
from sse_sam_jax.optim.sam_and_asam import asam, sam
from sse_sam_jax.optim.sharpness_aware import (
    ASAM_ETA,
    NORMALIZATIONS,
    SharpnessAwareState,
    adaptive_leaves,
    perturb,
    resolve_mask,
    sharpness_steps_of,
    validate_radius,
)
from sse_sam_jax.optim.sharpness_reuse import (
    SharpnessReuseState,
    SharpnessSteps,
    is_sharpness_step,
    looksam,
    random_fraction,
)
from sse_sam_jax.optim.stage_switch import (
    StageSwitchState,
    sam_then_imbsam,
    sharpness_step_at,
    sse_sam,
    stage_at,
    stage_boundaries,
    stage_switch,
    switch_step,
)

__all__ = [
    'HEAD',
    'TAIL',
    'example_groups',
    'tail_classes',
    'validate_class_counts',
    'validate_labels',
    'ASAM_ETA',
    'NORMALIZATIONS',
    'SharpnessAwareState',
    'adaptive_leaves',
    'asam',
    'focal_sam',
    'focal_weights',
    'group_coefficients',
    'group_sam',
    'imbsam',
    'mean_across',
    'perturb',
    'resolve_mask',
    'sam',
    'sharpness_steps_of',
    'validate_radius',
    'SharpnessReuseState',
    'SharpnessSteps',
    'is_sharpness_step',
    'looksam',
    'random_fraction',
    'StageSwitchState',
    'sam_then_imbsam',
    'sharpness_step_at',
    'sse_sam',
    'stage_at',
    'stage_boundaries',
    'stage_switch',
    'switch_step',
    'microbatched',
    'bind_extra_args',
    'check_composition',
]
