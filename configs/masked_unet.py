r"""Masked convolutional UNet pretraining: fill in randomly removed patches.

Command:
  python train_pretrain.py --config configs/masked_unet.py:base --workdir /tmp/unet
  python train_pretrain.py --config configs/masked_unet.py:large --workdir /tmp/unet_large
  python train_pretrain.py --config configs/masked_unet.py:runlocal --workdir /tmp/unet_smoke
  python train_classifier.py --mode probing --pretrained_path /tmp/unet

Model (mil_jax/models/masked_unet.py): 4x4 patches (64 per image), 60% of
them removed per image (the ratio of SparK and ConvNeXt V2's masked conv
pretraining), their pixels set to a learned value per channel; the loss is
the squared error of the removed pixels, and of the visible ones with weight
0.1, so the network also keeps what it sees. Encoder channels as the Conv
autoencoder's; the features are the bottleneck averaged over its positions.
Variants:
  base (default): 4 layers, factor 2, 8 start filters (8, 16, 32, 64): the
    Conv-256 encoder plus the fill value (43,739 params), 97,926 in all with
    the skip-joined decoder (Conv-256: 87,299); 64 features.
  large: 16 start filters (16, 32, 64, 128): 388,358 params (encoder
    173,491); 128 features.
  runlocal: fake data, seconds on a CPU (combine: 'large,runlocal').
Training: 100 epochs of batch 32 (as the Conv autoencoder), Adam 1e-3 with a
cosine decay to 0 over the run (our choice: the Conv autoencoder's 1e-4 is
the study's replay).

Expected runtime (1,563 steps per epoch of 50,000 images): the `base`
training step at batch 32 ran at 380-1,350 images/s (median 941, README
Performance) on a 2-core Intel Xeon (Sapphire Rapids class) shared with
other jobs, so 100 epochs are about 1.5 hours of steps on such a CPU; 2
epochs of 45,000 images took 15 minutes there under a load average of about
10, validation included. Not timed on a GPU.
Expected result: not measured at 100 epochs. After 2 epochs on real CIFAR-10
images (45,000 to train, 5,000 held out; README, Results): PSNR 20.8 dB with
the visible pixels, 18.6 dB on the removed ones alone, kNN accuracy .367, a
linear probe on the frozen encoder .275.
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
