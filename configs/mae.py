r"""Masked autoencoder pretraining on CIFAR-100 (the reference "MAE").

Command:
  python train_pretrain.py --config configs/mae.py:seed --workdir /tmp/mae_seed
  python train_pretrain.py --config configs/mae.py:notebook --workdir /tmp/mae_nb
  python train_pretrain.py --config configs/mae.py:fast --workdir /tmp/mae_fast
  python train_pretrain.py --config configs/mae.py:gpu --workdir runs/mae_gpu
  python train_pretrain.py --config configs/mae.py:seed,runlocal --workdir /tmp/mae_smoke

Variants:
  seed (default): the reference script's model. Patch 2 (256 patches, 64
    kept at mask ratio 0.75), width 192, 6 encoder / 2 decoder blocks, 3
    heads, MLP 768, learned position embeddings, cls-token features.
    3,700,620 params (encoder 2,721,600); the reference counted 3,662,604 /
    2,721,024 because its decoder had no input projection or final norm.
  notebook: the reference notebook's run, 8 encoder / 4 decoder blocks.
  fast: our design for a cheaper run of the same encoder width. Patch 4
    (64 patches, 16 kept): the encoder sees 17 tokens instead of 65 and the
    decoder 65 instead of 257, and the decoder is narrower (width 128, 4
    heads, MLP 512), as in the MAE paper where the decoder is much lighter
    than the encoder: 0.45 GFLOP of matrix multiplies per training image
    against the seed's 2.84 (the benchmark's count on the CPU at batch
    128), and 126-128 images/s against 22.6 on a 2-core CPU (`python -m
    mil_jax.bench --model mae:fast --batch 128`). Fixed 2-D sin-cos position
    embeddings (nothing to learn for the grid layout), per-patch normalized
    pixel targets and Adam b2 = 0.95, the MAE paper's choices for better
    representations.
  gpu: the `fast` model as a recipe for one GPU: bfloat16, batch 1024, the
    MAE paper's learning rate rule lr = 1.5e-4 * batch / 256 (6e-4 here; with
    --config.batch_size=4096 pass --config.optim.lr=2.4e-3), 40 warmup epochs
    then cosine, 1,500 epochs, evaluation every 10 epochs. Its expected
    runtime and result are below.
  attention=auto|xla|cudnn: how attention is computed (mil_jax.models.vit);
    'cudnn' needs an NVIDIA GPU and bfloat16. E.g. 'seed,attention=xla'.
  runlocal: fake data and a tiny model (width 16, 1 block each, 4x4
    patches); seconds on a CPU. Combine with a variant: 'fast,runlocal'.

Training, all variants but gpu: 2000 epochs of batch 128, AdamW 2e-4 with weight
decay 0.05, linear warmup for 200 epochs then cosine decay to 0, stepped
every step (the reference's scheduler never stepped and ran at 1e-6).
The reference saw 9.2 steps/s on its GPU: 2000 epochs took about a day.

Expected runtime (391 steps per epoch, 782,000 steps): a whole run was not
timed. The benchmark's training steps of the seed model ran at 37,400
images/s on one H100 and 45,400 on one H200, in bfloat16 at batch 4096 with
cuDNN attention (--config.model.dtype=bfloat16 --config.batch_size=4096;
scale the learning rate with it), which makes 2000 epochs about 45 and 37
minutes; at this config's batch 128 in float32, 22-23 images/s on a 2-core
CPU (README, Performance).
gpu (an estimate from the measured step rate, not a measured run): the fast
step ran at 168,000 images/s on one H200 in bfloat16 at batch 1024, so
1,500 epochs of 48 steps (73.7 million images of a 50,000-image split) take
about 7.3 minutes of training steps; evaluation, checkpoints and
compilation come on top, and the run fits about 8 minutes only once the
per-epoch overheads of the training loop are small.
Expected result: not measured yet. The gpu recipe is meant to be fine-tuned
with `configs/classifier.py:finetune`. The reference reached 0.219 top-1 with a
linear head and fine-tuning, 0.088 with a frozen encoder (reference/SEED.md).
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
