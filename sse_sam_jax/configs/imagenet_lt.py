"""ImageNet-LT with ResNet-50 and SSE-SAM (GPU/TPU). A common long-tail recipe, not one
given in shared/method.md: 90 epochs, batch 256, lr 0.1 cosine, wd 5e-4, random resized
crop + flip at 224, eta 100 (Many > 100, Few < 20 training images).

  tfds build imagenet2012 --manual_dir=<folder with the ILSVRC2012 tars> --file_format=array_record
  sse-sam-jax train --config imagenet_lt \
      data.train_list=/path/ImageNet_LT_train.txt data.test_list=/path/ImageNet_LT_test.txt
"""

from sse_sam_jax.train.config import default_config


def get_config():
  c = default_config()
  c.epochs = 90
  c.data.update(name='imagenet_lt', batch_size=256, augment=True, shots='default',
                num_workers=8, image_size=224, drop_remainder=True,
                train_list='ImageNet_LT_train.txt', test_list='ImageNet_LT_test.txt')
  c.model.name = 'resnet50'
  c.optimizer.update(name='sse_sam', head_rho=0.05, tail_rho=0.1, gamma=0.7, eta=100.0,
                     lr=0.1, schedule='cosine', momentum=0.9, weight_decay=5e-4)
  c.eval.update(every_epochs=10, batch_size=250)
  c.checkpoint.every_epochs = 1
  return c
