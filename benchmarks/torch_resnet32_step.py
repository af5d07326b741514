"""PyTorch's CPU step for the same model and batch as benchmarks/step_cost.py's SGD row.

CIFAR ResNet-32 (He et al. 2016, option-A shortcuts, as LDAM-DRW's and the SSE-SAM
authors' code), batch 128 of 32x32x3, 10 classes, cross-entropy, SGD momentum 0.9 +
weight decay, training mode (BatchNorm batch statistics). Run it with a CPU build of
PyTorch (``pip install torch==2.13.0+cpu`` works on Python 3.11 here); prints one
JSON line: median step milliseconds over ``--steps`` after warm-up.

  python benchmarks/torch_resnet32_step.py [--threads 2] [--steps 15] [--channels-last]
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.stride, self.pad = stride, cout - cin

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    short = x
    if self.stride != 1 or self.pad:
      short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
    return F.relu(out + short)


class ResNet32(nn.Module):

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(16)
    layers, cin = [], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
      for i in range(5):
        layers.append(Block(cin, cout, stride if i == 0 else 1))
        cin = cout
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.layers(F.relu(self.bn(self.conv(x))))
    return self.fc(x.mean((2, 3)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--steps', type=int, default=15)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--channels-last', action='store_true')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = ResNet32()
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
  x = torch.randn(args.batch, 3, 32, 32).to(memory_format=fmt)
  y = torch.randint(0, 10, (args.batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()

  for _ in range(3):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  print(json.dumps({'framework': 'torch', 'version': torch.__version__, 'threads': args.threads,
                    'channels_last': args.channels_last, 'batch': args.batch,
                    'median_ms': round(statistics.median(times) * 1e3, 1)}))


if __name__ == '__main__':
  main()
