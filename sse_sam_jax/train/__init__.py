"""Training: the train state, the jitted step, evaluation, checkpoints and the loop."""

from sse_sam_jax.train.config import default_config
from sse_sam_jax.train.step import CompiledTrainStep, TrainState, init_state, train_step
from sse_sam_jax.train.trainer import NonFiniteLossError, train

__all__ = [
    'default_config',
    'train',
    'NonFiniteLossError',
    'CompiledTrainStep',
    'TrainState',
    'init_state',
    'train_step',
]
