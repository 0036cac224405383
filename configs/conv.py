r"""Convolutional autoencoder pretraining on CIFAR-100 ("Conv-192" / "Conv-256").

Command:
  python train_pretrain.py --config configs/conv.py:192 --workdir /tmp/conv192
  python train_pretrain.py --config configs/conv.py:256 --workdir /tmp/conv256
  python train_pretrain.py --config configs/conv.py:layers=5,factor=2,filters=8 \
      --workdir /tmp/conv_5_2_8
  python train_pretrain.py --config configs/conv.py:256,runlocal --workdir /tmp/conv_smoke

Variants: '192' (default; 4 layers, factor 2, 6 start filters: 2x2x48 = 192
features, 49,347 params), '256' (8 start filters: 2x2x64 = 256 features,
87,299 params), or the sweep form 'layers=L,factor=F,filters=C' the reference
searched: (4,2,6) (4,3,6) (4,2,8) (5,2,8) (3,2,16). 100 epochs of batch 32,
Adam 1e-4, cosine decay over T_max = 1562 steps (torch CosineAnnealingLR:
the lr goes down to 0 at step 1562 and back up, period 3124), as the
reference configured it (its scheduler never stepped, so it actually ran at a
constant 1e-4; set --config.optim.schedule=constant to replay that).

Expected runtime (1,563 steps per epoch): an epoch's training steps took
12.4-13.3 s (Conv-192) and 13.4-15.2 s (Conv-256) on a 2-core CPU, and
0.70-0.72 s and 0.63-0.65 s on one H100 or H200 (`python -m mil_jax.bench
--model conv:192 --model conv:256 --batch 32 --epoch`): 100 epochs are
21-22 and 22-25 minutes on such a CPU, 70 and 65 s of steps on the GPU, plus each
epoch's validation and checkpoint. A whole run was not timed.
Expected result: not measured yet. The reference reached 0.198 (Conv-192) and
0.214 (Conv-256) top-1 with a linear head and fine-tuning (reference/SEED.md).
With `runlocal`: fake data, a few seconds on a CPU.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: '192' | '256' | 'layers=,factor=,filters=', plus 'runlocal'."""
  # filters=0 means "not given", so a preset and an explicit count can clash.
  args = common.parse_arg(arg, known=('192', '256', 'runlocal'), layers=4, factor=2, filters=0)
  if args['192'] and args['256']:
    raise ValueError("choose one of the variants '192' and '256', not both")
  if (args['192'] or args['256']) and args.filters:
    raise ValueError("the variants '192' and '256' fix the filters; drop filters=")
  filters = args.filters or (8 if args['256'] else 6)

  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=32, num_epochs=100, steps_per_dispatch=16)
  config.loss = 'l2'
  config.data = common.data_config()

  config.model = ml_collections.ConfigDict(dict(
      name='conv',
      num_layers=args.layers,         # stride-2 convs per half; 32 / 2**layers is the latent side
      channel_factor=args.factor,     # channel multiplier per layer
      start_filters=filters,          # channels of the first conv
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
  ))

  config.optim = common.optim_config('adam', 1e-4, 'cosine',
                                     cosine_steps=1562)  # torch CosineAnnealingLR T_max, in steps

  if args.runlocal:
    common.runlocal(config)
    config.optim.cosine_steps = 0     # the smoke run is far shorter than T_max
  return config
