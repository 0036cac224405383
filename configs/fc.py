r"""Fully connected autoencoder pretraining on CIFAR-100 (the reference "FC").

Command:
  python train_pretrain.py --config configs/fc.py:l2 --workdir /tmp/fc_l2
  python train_pretrain.py --config configs/fc.py:l1 --workdir /tmp/fc_l1
  python train_pretrain.py --config configs/fc.py:l2,runlocal --workdir /tmp/fc_smoke

Model: 3072 -> 1536 -> 768 -> 384 -> ... -> 3072, 12,394,368 params (encoder
6,195,840, features 384). 100 epochs of batch 128, Adam 1e-4 decayed by 0.9
per epoch, as the reference.

Expected runtime (391 steps per epoch): an epoch's training steps took
41-45 s on a 2-core CPU and 0.13-0.14 s on one H100 or H200 (`python -m
mil_jax.bench --model fc --batch 128 --epoch`), so 100 epochs are 70-75
minutes on such a CPU. On the H100 a whole epoch of `train_pretrain.py` (fake
data of CIFAR's size), validation and checkpoint included, took 0.38-0.48 s:
under a minute for the run. A whole run was not timed.
Expected result: not measured yet. The reference reached 0.187 (l2) and
0.186 (l1) top-1 with no pretraining and 0.235 / 0.245 with a linear head and
fine-tuning (reference/SEED.md); reconstruction loss not reported there.
With `runlocal`: fake data, widths 64-32-16, a few seconds on a CPU.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: 'l2' (default) or 'l1' (the loss), plus 'runlocal'."""
  args = common.parse_arg(arg, known=('l2', 'l1', 'runlocal'))
  if args.l1 and args.l2:
    raise ValueError("choose one of the variants 'l1' and 'l2', not both")

  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=128, num_epochs=100, steps_per_dispatch=8)
  # On a CPU split into cores, one device: the large dots already use every
  # core, and the gradient all-reduce of 12.4 M parameters cost more than a
  # second device gained (docs/performance.md).
  config.speed = common.speed_config(cpu_devices=1)
  config.loss = 'l1' if args.l1 else 'l2'
  config.data = common.data_config()

  config.model = ml_collections.ConfigDict(dict(
      name='fc',
      hidden_dims=(1536, 768, 384),   # encoder widths; the last is the latent
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
  ))

  config.optim = common.optim_config('adam', 1e-4, 'exponential',
                                     decay_rate=0.9)  # lr factor per epoch

  if args.runlocal:
    common.runlocal(config)
    config.model.hidden_dims = (64, 32, 16)
  return config
