r"""Classifiers over a pretrained encoder: the study's five protocols, and kNN.

Command (after a pretraining run, e.g. `python train_pretrain.py --type fc`):
  python train_classifier.py --mode probing                   # linear head, frozen encoder
  python train_classifier.py --mode probing --nofreeze        # linear head, fine-tuned encoder
  python train_classifier.py --mode fine_tune                 # MLP head, frozen encoder
  python train_classifier.py --mode fine_tune --nofreeze      # MLP head, fine-tuned encoder
  python train_classifier.py --mode fine_tune --nofreeze --from_scratch --type conv
  python train_classifier.py --mode knn                       # k-NN accuracy of the features
  python train_classifier.py --mode probing --config configs/classifier.py:seed
  python train_classifier.py --mode fine_tune --nofreeze --config configs/classifier.py:finetune \
      --pretrained_path runs/mae_gpu

Variants:
  (default) ours: AdamW 1e-3, warmup then cosine, crop + flip when the encoder trains.
  seed: the study's: Adam 3e-3 (1e-5 with a frozen encoder), constant, no augmentation.
  finetune: the MAE paper's fine-tuning recipe for an MAE encoder (docs/recipes.md).
  runlocal: fake data, 2 epochs, seconds on a CPU ('seed,runlocal').
  Each variant in full: docs/usage.md.

Expected runtime (40 epochs): a frozen encoder, seconds after one pass over the
  images; a trained encoder about 15 minutes (FC), 3 (Conv-192) and 38 hours (seed
  MAE) of steps on a 2-core CPU. finetune: about 73 s of steps on one H200,
  estimated (docs/performance.md).
Expected result: at 1 epoch on CIFAR-10, README, Results; not measured at these
  budgets. finetune aims at 0.90 top-1 on CIFAR-10; not measured yet.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: '' (ours), 'seed' (the study's), 'finetune' (MAE's), plus 'runlocal'."""
  args = common.parse_arg(arg, known=('seed', 'finetune', 'runlocal'))
  if args.seed and args.finetune:
    raise ValueError("choose one of the variants 'seed' and 'finetune'")
  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=128, num_epochs=40, steps_per_dispatch=8)
  # On a CPU split into cores: as many devices as the encoder's pretraining took,
  # one for a head on cached features.
  config.speed.cpu_devices = 'auto'
  config.log_every_steps = 100

  config.mode = 'probing'          # 'probing' (linear head) | 'fine_tune' (MLP head) | 'knn'
  config.freeze = True             # keep the encoder's weights fixed
  config.pretrained_path = ''      # a pretraining workdir or checkpoint; '' = newest under runs/
  config.runs_dir = 'runs'         # where the newest pretraining run is looked for
  config.from_scratch = False      # no pretraining: a randomly initialized encoder
  config.model_type = ''           # with from_scratch: 'fc' | 'conv' | 'mae' (its config's model)
  config.frozen_lr = 0.0           # > 0: this learning rate when the encoder is frozen
  config.label_smoothing = 0.0
  config.cache_features = True     # frozen encoder, no augmentation: features computed once
  # Regularizers of the encoder's training on images; a head on cached features
  # (frozen encoder, cache_features) sees none of them.
  config.drop_path_rate = 0.0      # stochastic depth of the last ViT block (mae encoders only)
  config.randaugment = ml_collections.ConfigDict(dict(
      num_ops=0,                   # ops per image after crop + flip (0 = off; mil_jax.augment)
      magnitude=9.0,               # strength of every op, 0 (none) to 10
  ))
  config.mix = ml_collections.ConfigDict(dict(
      mixup_alpha=0.0,             # > 0: blend with the reversed batch by Beta(a, a), soft targets
      cutmix_alpha=0.0,            # > 0: paste a box of the reversed batch, area ~ 1 - Beta(a, a)
      switch_prob=0.5,             # with both on: the chance an image gets cutmix, not mixup
  ))

  config.head = ml_collections.ConfigDict(dict(
      hidden_dim=0,                # MLP width; 0 = the study's: 192 for fc, 150 otherwise
      dropout_rate=0.2,
      batchnorm=False,             # non-affine BatchNorm before the linear head
  ))
  config.knn = ml_collections.ConfigDict(dict(
      k=20,                        # neighbours voting
      temperature=0.07,            # vote weight exp(cosine / temperature)
  ))

  config.data = common.data_config()
  config.data.augment = True       # applies when the encoder trains (see cache_features)

  config.optim = common.optim_config('adamw', 1e-3, 'warmup_cosine', weight_decay=1e-4,
                                     warmup_epochs=2)
  # < 1: the learning rate of ViT block i of D is lr * layer_decay ** (D - i),
  # the embeddings' lr * layer_decay ** (D + 1) (mil_jax.optim.layer_decay_rules).
  config.optim.layer_decay = 1.0

  if args.seed:
    config.optim.update(name='adam', lr=3e-3, weight_decay=0.0, schedule='constant',
                        warmup_epochs=0)
    config.frozen_lr = 1e-5
    config.data.augment = False
  if args.finetune:
    config.mode, config.freeze = 'fine_tune', False
    config.batch_size, config.num_epochs = 512, 100
    config.optim.update(lr=1e-3 * config.batch_size / 256, weight_decay=0.05, warmup_epochs=5,
                        layer_decay=0.75)
    config.drop_path_rate = 0.1
    config.label_smoothing = 0.1
    config.randaugment.num_ops = 2
    config.mix.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  if args.runlocal:
    common.runlocal(config)
    config.optim.warmup_epochs = 0
  return config
