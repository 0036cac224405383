r"""The study's sweep of the Conv autoencoder's size, as one command.

Command:
  python -m mil_jax.sweep --config configs/sweep.py:quick --workdir runs/sweep       # one GPU
  python -m mil_jax.sweep --config configs/sweep.py:seed --workdir runs/sweep_seed   # 100 epochs
  python -m mil_jax.sweep --config configs/sweep.py:runlocal --workdir runs/sweep_smoke  # fake data
  # Real CIFAR-10 on a 2-core CPU: 45,000 images to train, 5,000 held out.
  python -m mil_jax.sweep --config configs/sweep.py:cpu --workdir runs/sweep_cpu \
      --config.data.source=npz:/path/cifar10.npz \
      --config.data.train_split='train[:45000]' --config.data.eval_split='train[45000:]'

The study chose Conv-192 and Conv-256 by pretraining the Conv autoencoder at
the points (layers, channel factor, start filters) = (4,2,6) (4,3,6) (4,2,8)
(5,2,8) (3,2,16) (configs/conv.py:layers=L,factor=F,filters=C) and scoring
each by the kNN accuracy of its features. Each point is a row of a
``mil_jax.reproduce`` grid with no protocol columns: its pretraining cell
(giving the reconstruction PSNR) and its kNN cell. ``mil_jax.sweep`` runs the
grid (resuming as the grid does) and writes WORKDIR/sweep.md, sweep.json
(per point: parameters, encoder parameters, latent size, kNN accuracy, PSNR)
and sweep.png (parameters and latent size against kNN accuracy and PSNR).

Variants (as configs/reproduce.py's, whose data and classifier settings they
share; add pretrain_epochs=N to change every point's budget):
  seed: 100 pretraining epochs per point, the study's budget.
  quick: 5 epochs per point (one GPU).
  cpu: 2 epochs per point on real data on a 2-core CPU.
  runlocal: the points on fake data for 1 epoch (what the tests run).

Expected runtime: the sum of the points' pretraining; with `seed`, about 21-25
minutes of steps per Conv-192/256-sized point on a 2-core CPU (configs/conv.py),
more for (4,3,6) and (3,2,16). The `cpu` sweep took 45 minutes on a shared
2-core CPU (README, Results); the others were not timed.
Expected result: the study reported only its choice (latent 192 and 256),
not the scores of its points. At the `cpu` budget on CIFAR-10 the kNN
accuracies were .32-.38, (3,2,16) the lowest and the other four within .02.
"""
from __future__ import annotations

import ml_collections

from configs import common, reproduce

# (layers, channel factor, start filters) of the study's sweep.
POINTS = ((4, 2, 6), (4, 3, 6), (4, 2, 8), (5, 2, 8), (3, 2, 16))
VARIANTS = ('seed', 'quick', 'cpu', 'runlocal')


def point_key(layers: int, factor: int, filters: int) -> str:
  """The row key of a point, e.g. 'conv_4_2_6'."""
  return f'conv_{layers}_{factor}_{filters}'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: 'seed' (default) | 'quick' | 'cpu', 'runlocal' alone or added to one of
  them, plus pretrain_epochs=N."""
  args = common.parse_arg(arg, known=VARIANTS, pretrain_epochs=0)
  variant = ','.join(v for v in VARIANTS if args[v])
  config = reproduce.get_config(variant or None)  # raises on two variants
  budget = next((v for v in ('quick', 'cpu') if args[v]), 'seed')
  epochs = 1 if args.runlocal else {'seed': 0, 'quick': 5, 'cpu': 2}[budget]
  config.row = ml_collections.ConfigDict()
  for layers, factor, filters in POINTS:
    pretrain = f'conv:layers={layers},factor={factor},filters={filters}'
    row = reproduce.row_config(f'Conv ({layers},{factor},{filters})',
                               pretrain + (',runlocal' if args.runlocal else ''),
                               (None,) * len(reproduce.COLUMNS))
    row.num_epochs = args.pretrain_epochs or epochs   # 0: the config's 100
    config.row[point_key(layers, factor, filters)] = row
  config.rows = ','.join(point_key(*p) for p in POINTS)
  config.columns = ''   # the study scored its points by kNN accuracy alone
  config.knn = True
  return config
