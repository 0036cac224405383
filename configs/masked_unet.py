r"""Masked convolutional UNet pretraining: fill in randomly removed patches.

Command:
  python train_pretrain.py --config configs/masked_unet.py:base --workdir /tmp/unet
  python train_classifier.py --mode probing --pretrained_path /tmp/unet

Variants:
  base (default): the Conv-256 encoder, a skip-joined decoder: 97,926 params, 64 features.
  large: 16 start filters: 388,358 params, 128 features.
  runlocal: fake data, seconds on a CPU ('large,runlocal').
  The model (60% of 4x4 patches removed, a learned fill) in full: docs/usage.md.

Expected runtime (base, 100 epochs of batch 32): about 1.5 hours of training steps on
  a 2-core CPU; 2 epochs of 45,000 images took 15 minutes on a shared one
  (docs/performance.md). Not timed on a GPU.
Expected result: not measured at 100 epochs. After 2 epochs on CIFAR-10 (README,
  Results): PSNR 20.8 dB (18.6 dB on the removed pixels alone), kNN .367, linear
  probe on the frozen encoder .275.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: 'base' (default) | 'large', plus 'runlocal'."""
  args = common.parse_arg(arg, known=('base', 'large', 'runlocal'))
  if args.base and args.large:
    raise ValueError("choose one of the variants 'base' and 'large', not both")

  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=32, num_epochs=100, steps_per_dispatch=16)
  config.loss = 'masked_image_l2'
  config.visible_loss_weight = 0.1  # a visible pixel's error against 1 for a removed one
  config.data = common.data_config()

  config.model = ml_collections.ConfigDict(dict(
      name='masked_unet',
      num_layers=4,                   # stride-2 convs per half; bottleneck side 32 / 2**layers
      channel_factor=2,               # channel multiplier per layer
      start_filters=16 if args.large else 8,  # channels of the first conv
      patch_size=4,                   # side of a masked square; divides 32
      mask_ratio=0.6,                 # fraction of patches removed in training, in [0, 1)
      mask_fill='learned',            # a removed pixel holds: 'learned' (per channel) | 'zero'
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
  ))

  config.optim = common.optim_config('adam', 1e-3, 'cosine')  # cosine_steps 0: the whole run

  if args.runlocal:
    common.runlocal(config)
  return config
