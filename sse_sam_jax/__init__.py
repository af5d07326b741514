"""sse-sam-jax: SAM, ImbSAM and SSE-SAM for long-tailed training in JAX/Optax."""

from sse_sam_jax.optim import (
    HEAD, TAIL, NORMALIZATIONS, SharpnessAwareState, StageSwitchState, example_groups,
    group_coefficients, group_sam, imbsam, mean_across, perturb, sam, sam_then_imbsam, sse_sam,
    stage_at, stage_switch, switch_step, tail_classes, validate_class_counts, validate_radius)

__version__ = '0.1.0'
