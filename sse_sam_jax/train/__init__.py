"""Training: the train state, the jitted step, evaluation, checkpoints and the loop."""

from sse_sam_jax.train.step import CompiledTrainStep, TrainState, init_state, train_step

__all__ = [
    'CompiledTrainStep',
    'TrainState',
    'init_state',
    'train_step',
]
