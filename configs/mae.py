r"""Masked autoencoder pretraining on CIFAR-100 (the study's "MAE").

Command:
  python train_pretrain.py --config configs/mae.py:seed --workdir /tmp/mae_seed
  python train_pretrain.py --config configs/mae.py:fast --workdir /tmp/mae_fast
  python train_pretrain.py --config configs/mae.py:gpu --workdir runs/mae_gpu

Variants:
  seed (default): the study's model: patch 2, width 192, 6 encoder / 2 decoder blocks,
    3,700,620 params.
  notebook: the study notebook's run, 8 encoder / 4 decoder blocks.
  fast: patch 4, a narrower decoder, sin-cos positions, normalized pixel targets.
  gpu: the fast model for one GPU: bfloat16, batch 1024, 1,500 epochs (docs/recipes.md).
  attention=auto|xla|cudnn: how attention is computed ('seed,attention=xla').
  runlocal: fake data and a tiny model, seconds on a CPU ('fast,runlocal').
  Each variant in full: docs/usage.md.

Expected runtime: seed (2000 epochs), not timed whole: about 37 minutes of steps on
  one H200 in bfloat16 at batch 4096 (45 on an H100); 22-23 images/s at batch 128
  on a 2-core CPU. fast: 126-128 images/s on that CPU. gpu: about 7.3 minutes of
  training steps on one H200, estimated from the measured step rate
  (docs/performance.md).
Expected result: not measured yet (README, Results: a tiny 2-epoch MAE only). The
  study: .219 top-1 linear + fine-tune, .088 with a frozen encoder, on CIFAR-100.
"""
from __future__ import annotations

import ml_collections

from configs import common

# The MAE paper's base learning rate; a run's is base * batch_size / 256.
GPU_BASE_LR = 1.5e-4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: 'seed' (default) | 'notebook' | 'fast' | 'gpu', plus 'runlocal'."""
  args = common.parse_arg(arg, known=('seed', 'notebook', 'fast', 'gpu', 'runlocal'),
                          attention='auto')
  if args.seed + args.notebook + (args.fast or args.gpu) > 1:
    raise ValueError("choose one of the variants 'seed', 'notebook' and 'fast' (or 'gpu')")

  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=128, num_epochs=2000, steps_per_dispatch=8)
  config.loss = 'masked_l2'
  config.data = common.data_config()

  config.model = ml_collections.ConfigDict(dict(
      name='mae',
      image_size=32,
      patch_size=2,                   # must divide image_size; N = (32 / patch_size)**2
      width=192,
      depth=6,
      num_heads=3,
      mlp_dim=768,
      decoder_width=192,
      decoder_depth=2,
      decoder_num_heads=3,
      decoder_mlp_dim=768,
      mask_ratio=0.75,                # fraction of patches removed in training, in [0, 1)
      norm_pix_loss=False,            # targets normalized per patch
      pos_embedding='learned',        # 'learned' | 'sincos'
      pool='cls',                     # features: 'cls' token | 'mean' of patch tokens
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
      attention=args.attention,       # 'auto' | 'xla' | 'cudnn' (mil_jax.models.vit)
  ))

  config.optim = common.optim_config('adamw', 2e-4, 'warmup_cosine', weight_decay=0.05,
                                     warmup_epochs=200)  # then cosine to 0 at the end

  if args.notebook:
    config.model.depth = 8
    config.model.decoder_depth = 4
  if args.fast or args.gpu:
    config.model.patch_size = 4
    config.model.decoder_width = 128
    config.model.decoder_num_heads = 4
    config.model.decoder_mlp_dim = 512
    config.model.pos_embedding = 'sincos'
    config.model.norm_pix_loss = True
    config.optim.b2 = 0.95
  if args.gpu:
    config.model.dtype = 'bfloat16'
    config.batch_size, config.num_epochs = 1024, 1500
    config.eval_every_epochs = 10
    config.optim.update(lr=GPU_BASE_LR * config.batch_size / 256, warmup_epochs=40)

  if args.runlocal:
    common.runlocal(config)
    config.model.update(dict(
        patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
        decoder_width=16, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32))
    config.optim.warmup_epochs = 1
  return config
