"""CIFAR-100-LT IF 100, the SSE-SAM reference recipe (GPU/TPU; needs TFDS cifar100 prepared).

ResNet-34 with a CIFAR stem, 200 epochs, batch 64, lr 0.01 cosine to 0 over epochs,
wd 1e-3, eta 100, rho_head 0.05, rho_tail 0.1, gamma 0.7, flip TTA at test time.
The reference selects on the test set; here the final model is reported
(eval.select_on='test' reproduces the reference's selection, knowingly).

  tfds build cifar100 --file_format=array_record
  sse-sam-jax train --config cifar100_lt_ssesam --workdir runs/c100_ssesam
"""

from sse_sam_jax.train.config import default_config


def get_config():
  c = default_config()
  c.epochs = 200
  c.data.name = 'cifar100'
  c.data.imbalance_factor = 100.0
  c.data.batch_size = 64
  c.data.augment = True
  c.data.shots = 'default'
  c.data.num_workers = 2
  c.model.name = 'resnet34_cifar'
  c.loss.name = 'ce'
  c.optimizer.update(name='sse_sam', head_rho=0.05, tail_rho=0.1, gamma=0.7, eta=100.0,
                     normalization='batch', lr=0.01, schedule='cosine', momentum=0.9,
                     weight_decay=1e-3)
  c.eval.flip_tta = True
  c.eval.every_epochs = 10
  c.checkpoint.every_epochs = 5
  return c
