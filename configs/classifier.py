r"""Classifiers over a pretrained encoder: the study's five protocols, and kNN.

Command (after a pretraining run, e.g. `python train_pretrain.py --type fc`):
  python train_classifier.py --mode probing                   # linear head, frozen encoder
  python train_classifier.py --mode probing --nofreeze        # linear head, fine-tuned encoder
  python train_classifier.py --mode fine_tune                 # MLP head, frozen encoder
  python train_classifier.py --mode fine_tune --nofreeze      # MLP head, fine-tuned encoder
  python train_classifier.py --mode fine_tune --nofreeze --from_scratch --type conv
  python train_classifier.py --mode knn                       # k-NN accuracy of the features
  python train_classifier.py --mode probing --config configs/classifier.py:seed

Variants:
  (default) our choices: AdamW 1e-3, weight decay 1e-4, 2 warmup epochs then
    cosine to 0, random crop + flip when the encoder trains, 40 epochs of batch
    128. A frozen encoder trains its head on features computed once.
  seed: the study's choices: Adam 3e-3 (1e-5 when the encoder is frozen), no
    schedule, no augmentation.
  runlocal: fake data, 2 epochs, seconds on a CPU (combine: 'seed,runlocal').

Expected runtime (40 epochs of 50,000 images at batch 128), from the
benchmark's training steps on a 2-core CPU (`python -m mil_jax.bench --model
fc --model conv:192 --model mae:seed --batch 128 --stage probe|finetune`):
a head on cached features (a frozen encoder) ran at 250,000-530,000
images/s, seconds for the run after the one pass that computes the
features; a trained encoder with the MLP head ran at about 2,300 images/s
(FC), 10,900 (Conv-192) and 14.7 (the seed MAE, whose encoder then sees all
257 tokens): about 15 minutes, 3 minutes and 38 hours. Fine-tune an MAE on a
GPU. Whole runs were not timed.
Expected result: not measured yet; the study's CIFAR-100 numbers are in
reference/SEED.md ("Results").
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: '' (ours), 'seed' (the study's), plus 'runlocal'."""
  args = common.parse_arg(arg, known=('seed', 'runlocal'))
  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=128, num_epochs=40, steps_per_dispatch=8)
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

  if args.seed:
    config.optim.update(name='adam', lr=3e-3, weight_decay=0.0, schedule='constant',
                        warmup_epochs=0)
    config.frozen_lr = 1e-5
    config.data.augment = False
  if args.runlocal:
    common.runlocal(config)
    config.optim.warmup_epochs = 0
  return config
