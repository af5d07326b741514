"""Training: the train state, the jitted step, evaluation, checkpoints and the loop."""

from sse_sam_jax.train.step import TrainState, init_state, jit_train_step, train_step
