"""CIFAR-10/100-LT with the LDAM-DRW recipe (Cao et al.) and SAM-family optimizers.

ResNet-32 (normalised classifier), 200 epochs, batch 128, lr 0.1 with 5 warm-up
epochs, x0.01 from epoch 160 and x0.0001 from 180, wd 2e-4, LDAM (max margin 0.5,
scale 30) with DRW (beta 0.9999) from epoch 160. Default CIFAR-100; override
data.name=cifar10 data.shots=cifar10 optimizer.eta=1000 for CIFAR-10.
"""

from sse_sam_jax.train.config import default_config


def get_config():
  c = default_config()
  c.epochs = 200
  c.data.update(name='cifar100', imbalance_factor=100.0, batch_size=128, augment=True,
                shots='default', num_workers=2)
  c.model.update(name='resnet32', normed_classifier=True)
  c.loss.update(name='ldam', drw_epoch=160, drw_beta=0.9999, ldam_max_margin=0.5, ldam_scale=30.0)
  c.optimizer.update(name='sse_sam', head_rho=0.05, tail_rho=0.1, gamma=0.7, eta=100.0,
                     lr=0.1, schedule='ldam_step', warmup_epochs=5, momentum=0.9,
                     weight_decay=2e-4)
  c.eval.every_epochs = 10
  return c
