"""What every key of the training config means: the source of the documentation's
config reference (``docs/training.md``), checked against :func:`default_config` by
``tests/test_docs.py`` so that a key added later without a meaning fails the suite."""

from __future__ import annotations

MEANINGS = {
    'seed': 'Seed of the model initialisation, the data order and the long-tailed subsampling.',
    'epochs': 'Epochs of training; schedules, DRW and the stage switch are counted in them.',
    # data
    'data.name': "The dataset: 'mnist1d' (generated offline), 'cifar10', 'cifar100', 'npz', "
                 "'imagenet_lt', 'inaturalist2018' (TFDS, prepared beforehand).",
    'data.imbalance_factor': 'Largest / smallest class size of the long-tailed training set '
                             '(1: keep the data as it is, no subsampling).',
    'data.profile': "Imbalance profile: 'exp' (LDAM-DRW's n_max * (1/IF)^(i/(C-1))) or 'step'.",
    'data.selection': "Which examples a class keeps: 'shuffle' (seeded, LDAM-DRW's) or 'first' "
                      "(the SSE-SAM code's).",
    'data.iid_noise_scale': 'MNIST-1D: the i.i.d. noise of the generator.',
    'data.num_samples': 'MNIST-1D: examples generated before the long-tailed subsampling.',
    'data.n_max': 'MNIST-1D: examples of the largest class.',
    'data.val_fraction': 'Share of the training set held out as a validation split (0: none).',
    'data.val_generated': 'MNIST-1D: a balanced validation split of this many freshly '
                          'generated examples (another generator seed); 0: none.',
    'data.data_dir': "TFDS data directory ('': TFDS's default).",
    'data.num_classes': "'npz': the number of classes; 0: max(label) + 1 (refused when far "
                        'above the number of distinct labels).',
    'data.npz_path': "'npz': the file with arrays x [N, ...] and y [N] (optional x_test, y_test).",
    'data.train_list': 'ImageNet-LT: the ImageNet_LT_train.txt list (file names matched).',
    'data.test_list': 'ImageNet-LT: the ImageNet_LT_test.txt list.',
    'data.image_size': 'ImageNet-LT / iNaturalist: the crop size.',
    'data.batch_size': 'Global batch size (all devices and hosts together).',
    'data.drop_remainder': "Drop each epoch's last partial batch instead of training on it.",
    'data.num_workers': "grain worker processes (0: batches made in the trainer's process).",
    'data.augment': 'CIFAR: pad-crop-flip augmentation of training batches.',
    'data.shots': "Many/Medium/Few thresholds: 'default' (more than 100 / 20 to 100 / fewer "
                  "than 20), 'cifar10' and 'mnist1d' (1000 / 200).",
    'data.pad_last_batch': "Run the epoch's partial batch padded, with a mask, in the full "
                           "batch's program (the same step to float rounding; one program per "
                           'stage instead of two).',
    'data.batch_order': 'A .npy [epochs, N] of training-example indices, row e the order of '
                        "epoch e, instead of the seeded shuffle; '': the shuffle.",
    'data.augment_on': "Where augmentation runs: 'host' (grain), 'device' (the training "
                       'images held on every device; the host sends their indices and the '
                       "random draws), 'auto' (the device for in-memory images up to 2 GiB). "
                       'The same batches either way.',
    'data.prefetch_batches': 'Batches made ahead of the loop in as many threads (0: in the '
                             "loop's thread).",
    # model
    'model.name': "The network: 'conv1d', 'mlp', 'resnet32', 'resnet34_cifar', 'resnet50'.",
    'model.normed_classifier': "Cosine classifier (LDAM's NormedLinear) instead of a dense one.",
    'model.running_stats': "BatchNorm running statistics from the 'clean' pass, from the "
                           "step's 'last_perturbed' pass, or from 'every_pass' as the "
                           "authors' PyTorch loop keeps them: every forward pass of the "
                           "reference's step folded in, in its order, with the unbiased "
                           'batch variance.',
    'model.param_dtype': "'float32', or 'float64': parameters, data and every computation in "
                         "float64 (JAX's x64 mode), for replaying float64 references.",
    'model.init_from': 'An .npz of initial parameters and BatchNorm statistics '
                       '(models.save_weights; foreign weights converted to its names) '
                       "instead of the seeded initialisation; '': none.",
    'model.compute_dtype': "'float32', or 'bfloat16' (mixed precision): convolutions and dense "
                           'layers in bfloat16; BatchNorm, the loss, parameters, optimizer '
                           'state and the update in float32.',
    'model.init': "'flax' (Flax's defaults) or 'torch' (PyTorch's: every kernel and bias "
                  'uniform in +-1/sqrt(fan_in)); conv1d and mlp only.',
    # loss
    'loss.name': "Per-example loss: 'ce', 'ldam', 'logit_adjusted', 'vs'.",
    'loss.drw_epoch': 'Deferred re-weighting (class-balanced weights) from this epoch on; -1: off.',
    'loss.drw_beta': "DRW's class-balanced beta.",
    'loss.ldam_max_margin': "LDAM's largest margin (of the smallest class).",
    'loss.ldam_scale': "LDAM's logit scale.",
    'loss.tau': 'Logit adjustment / VS: the prior exponent tau.',
    'loss.vs_gamma': "VS loss: the multiplicative scale's exponent gamma.",
    'loss.group_normalised': "Every example's loss x B / its head/tail group's size in the "
                             'batch: the group-normalised loss for any optimizer.',
    # optimizer
    'optimizer.name': "'sgd', 'sam', 'asam', 'imbsam', 'group_sam', 'sse_sam', "
                      "'sam_then_imbsam', 'shot_sam', 'focal_sam'.",
    'optimizer.rho': 'Radius of SAM / ASAM / Focal-SAM; ImbSAM uses tail_rho.',
    'optimizer.head_rho': "SSE-SAM's head radius in stage 1 (0 in stage 2).",
    'optimizer.tail_rho': 'Tail radius of ImbSAM, SSE-SAM and sam_then_imbsam.',
    'optimizer.gamma': "SSE-SAM: the fraction of the epochs in stage 1; stage 2 starts at "
                       'epoch ceil(gamma * epochs).',
    'optimizer.eta': 'Classes with fewer training examples than eta are tail.',
    'optimizer.normalization': "Group losses: 'batch' (sum over the group / B, the papers' "
                               "code) or 'group' (each group's mean).",
    'optimizer.tail_weight': "ImbSAM: weight of the tail loss (the ImbSAM repository's current "
                             'code: 2).',
    'optimizer.base': "Base optimizer: 'sgd' (heavy ball), 'nesterov' or 'adamw'.",
    'optimizer.lr': 'Peak learning rate.',
    'optimizer.schedule': "Learning-rate schedule by epoch: 'cosine', 'constant' or "
                          "'ldam_step' (LDAM-DRW's x0.01 at 160 and x0.0001 at 180 of 200).",
    'optimizer.warmup_epochs': 'Linear warm-up over this many epochs (0: none).',
    'optimizer.momentum': 'SGD / Nesterov momentum.',
    'optimizer.b1': "AdamW's b1.",
    'optimizer.b2': "AdamW's b2.",
    'optimizer.eps': "AdamW's eps.",
    'optimizer.weight_decay': 'Weight decay (coupled, at the unperturbed weights, for SGD; '
                              'decoupled for AdamW).',
    'optimizer.clip_norm': 'Clip the sharpness-aware direction to this global norm (0: off).',
    'optimizer.adaptive': "ASAM's ascent step for any SAM-family name.",
    'optimizer.adaptive_eta': "ASAM's eta (T = |w| + eta).",
    'optimizer.sharpness_every': 'Perturbed passes on every n-th step only (LookSAM-style reuse '
                                 'in between); 1: every step.',
    'optimizer.sharpness_fraction': 'Perturbed passes on a random fraction of those steps.',
    'optimizer.sharpness_alpha': 'Weight of the reused sharpness component.',
    'optimizer.sharpness_scale': "'looksam' (alpha x the gradient's norm) or 'measured' (the "
                                 'size measured on the last sharpness step, x alpha).',
    'optimizer.shot_rhos': "'shot_sam': radii of the Many, Medium and Few groups.",
    'optimizer.focal_lambda': "Focal-SAM's lambda.",
    'optimizer.focal_gamma': "Focal-SAM's gamma: sharpness weighted by (1 - class share)^gamma.",
    # evaluation, checkpoints, analysis
    'eval.flip_tta': 'Average the logits of an image and its horizontal flip.',
    'eval.every_epochs': 'Evaluate every n epochs (and after the last).',
    'eval.select_on': "Keep the best checkpoint by 'val' or 'test' accuracy; 'none': last only.",
    'eval.batch_size': 'Evaluation batch size.',
    'checkpoint.every_epochs': 'Save a checkpoint every n epochs (and after the last).',
    'checkpoint.keep': 'How many of the latest checkpoints to keep.',
    'hessian.every_epochs': 'Log head/tail Hessian extremes every n epochs (0: off).',
    'hessian.max_examples': 'Training examples the Hessian is taken over.',
    'hessian.lanczos_iters': 'Lanczos iterations per extreme.',
    'hessian.seed': 'Seed of the example subset and the Lanczos start.',
    'log_every_steps': 'Training metrics to metrics.jsonl and TensorBoard every n steps.',
    # execution
    'steps_per_dispatch': 'Consecutive batches of the full shape (a padded last batch '
                          'included) run in one compiled program; 0 (auto): 1 on CPUs; on '
                          "GPUs and TPUs the divisor of the epoch's steps nearest to 8 in "
                          '4..16 (one program per stage), else 8.',
    'num_devices': 'Devices of the mesh (0: all local devices).',
    'perturbation_scope': "'global' (the whole batch's perturbation), 'per_device' (each "
                          "device's shard: m-sharpness) or 'microbatch'.",
    'perturbation_microbatch': "'microbatch' scope: examples per perturbation.",
    'parameter_sharding': "'replicated' or 'fsdp' (arrays of >= fsdp_min_elements split over "
                          'the devices).',
    'fsdp_min_elements': "'fsdp': the smallest array that is split.",
    'compilation_cache_dir': "JAX's persistent compilation cache and the serialized training "
                             "programs: 'workdir' (kept by --restart), a path (shared by "
                             "runs, e.g. a seed sweep's), or '' (off).",
    'background_compile_threads': "Threads that build the step's later programs while the "
                                  'first trains; -1 (auto): 0 on CPUs.',
    'cpu_convolutions': "XLA:CPU convolutions: 'eigen' (default) or 'ynnpack'.",
}


def flat_keys(c, prefix: str = '') -> dict:
  """``{'data.batch_size': 128, ...}``: every leaf of a config, dotted."""
  out = {}
  for key, value in c.items():
    if hasattr(value, 'items'):
      out.update(flat_keys(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def reference_table() -> str:
  """The Markdown table of every key of the default config: key, default, meaning.
  Raises ``KeyError`` naming a key without a meaning (or a meaning without a key)."""
  from sse_sam_jax.train.config import default_config  # pylint: disable=g-import-not-at-top
  keys = flat_keys(default_config())
  missing, stale = sorted(set(keys) - set(MEANINGS)), sorted(set(MEANINGS) - set(keys))
  if missing or stale:
    raise KeyError(f'config keys without a meaning: {missing}; meanings without a key: {stale}')
  rows = ['| key | default | meaning |', '| --- | --- | --- |']
  rows += [f'| `{k}` | `{keys[k]!r}` | {MEANINGS[k]} |' for k in sorted(keys)]
  return '\n'.join(rows) + '\n'
