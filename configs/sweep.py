r"""The study's sweep of the Conv autoencoder's size, as one command.

Command:
  python -m mil_jax.sweep --config configs/sweep.py:quick --workdir runs/sweep       # one GPU
  python -m mil_jax.sweep --config configs/sweep.py:seed --workdir runs/sweep_seed   # 100 epochs
  python -m mil_jax.sweep --config configs/sweep.py:runlocal --workdir runs/sweep_smoke  # fake data
  # Real CIFAR-10 on a 2-core CPU: 45,000 images to train, 5,000 held out.
  python -m mil_jax.sweep --config configs/sweep.py:cpu --workdir runs/sweep_cpu \
      --config.data.source=npz:/path/cifar10.npz \
      --config.data.train_split='train[:45000]' --config.data.eval_split='train[45000:]'

The points (layers, channel factor, start filters) = (4,2,6) (4,3,6) (4,2,8)
(5,2,8) (3,2,16), each a row of a ``mil_jax.reproduce`` grid with only its
pretraining and kNN cells; WORKDIR/sweep.md, sweep.json and sweep.png compare them
(docs/usage.md).

Variants (as configs/reproduce.py's; add pretrain_epochs=N to change every point's budget):
  seed: 100 pretraining epochs per point, the study's budget.
  quick: 5 epochs per point (one GPU).
  cpu: 2 epochs per point on real data on a 2-core CPU.
  runlocal: the points on fake data for 1 epoch (what the tests run).

Expected runtime: cpu: 45 minutes on a shared 2-core CPU, measured. seed: about
  21-25 minutes of steps per Conv-192/256-sized point on a 2-core CPU, more for
  (4,3,6) and (3,2,16). The others were not timed (docs/performance.md).
Expected result: cpu on CIFAR-10: kNN .32-.38, (3,2,16) the lowest and the other
  four within .02 (docs/results.md). The study reported only its choice (latent 192
  and 256), not the scores of its points.
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
