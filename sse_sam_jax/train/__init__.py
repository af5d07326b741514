"""Training: the train state, the jitted step, evaluation, checkpoints and the loop."""

from sse_sam_jax.train.compiled_step import CompiledTrainStep
from sse_sam_jax.train.config import default_config
from sse_sam_jax.train.periodic import NonFiniteLossError
from sse_sam_jax.train.step import TrainState, init_state, train_step
from sse_sam_jax.train.trainer import train

__all__ = [
    'default_config',
    'train',
    'NonFiniteLossError',
    'CompiledTrainStep',
    'TrainState',
    'init_state',
    'train_step',
]
