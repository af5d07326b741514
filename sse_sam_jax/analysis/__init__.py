"""Saddle-point analysis: group-restricted Hessian-vector products and spectra."""

from sse_sam_jax.analysis.hessian import (
    GroupLoss,
    example_weights,
    extreme_eigenvalues,
    hutchinson_trace,
    lanczos,
    power_iteration,
    slq_density,
    tridiagonal_eig,
)
from sse_sam_jax.analysis.spectra import group_spectra, groups_for, model_loss, plot_densities

__all__ = [
    'GroupLoss',
    'example_weights',
    'extreme_eigenvalues',
    'group_spectra',
    'groups_for',
    'hutchinson_trace',
    'lanczos',
    'model_loss',
    'plot_densities',
    'power_iteration',
    'slq_density',
    'tridiagonal_eig',
]
