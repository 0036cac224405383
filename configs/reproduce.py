r"""The whole study in one command: every encoder row, every protocol column.

Command:
  python -m mil_jax.reproduce --config configs/reproduce.py:quick --workdir runs/grid_quick
  python -m mil_jax.reproduce --config configs/reproduce.py:seed --workdir runs/grid_seed
  python -m mil_jax.reproduce --config configs/reproduce.py:runlocal --workdir runs/grid_smoke
  # Real CIFAR-10 on a 2-core CPU: 45,000 images to train, 5,000 held out.
  python -m mil_jax.reproduce --config configs/reproduce.py:cpu --workdir runs/grid_cpu \
      --config.data.source=npz:/path/cifar10.npz \
      --config.data.train_split='train[:45000]' --config.data.eval_split='train[45000:]'
  # Only some rows / columns, a different budget:
  python -m mil_jax.reproduce --config configs/reproduce.py:quick,classifier_epochs=3 \
      --config.rows=conv_192,mae --config.columns=linear_frozen --workdir runs/grid_part

Rows are ROWS below (FC+l1, FC+l2, Conv-192, Conv-256, MAE, Masked UNet), columns
COLUMNS (the study's five protocols); ``config.rows`` / ``config.columns`` pick
which run, ``config.data`` replaces every cell's data block (docs/usage.md).

Variants (add keyed budgets: pretrain_epochs=N, mae_epochs=N, classifier_epochs=N):
  seed: the study's budgets: 100 / 2000 (MAE) pretraining and 40 classifier epochs.
  quick: one GPU: 5 pretraining epochs (the fast MAE 20), 5 classifier epochs.
  cpu: real data on a 2-core CPU: 2 pretraining epochs (a tiny MAE), 1 classifier epoch.
  runlocal: fake data, tiny models, 1 epoch; minutes on a CPU (what the tests run).

Expected runtime: cpu, measured: about 19 minutes for the study's 35 cells on a
  2-core CPU, 28 more for the Masked UNet row. quick: under 15 minutes on one GPU,
  estimated, not measured. seed: days on one GPU (docs/performance.md).
Expected result: cpu: README, Results (a check on real images, not a result).
  seed should land near the study's table; not measured yet. WORKDIR/results.md
  prints our number with the study's beside it.
"""
from __future__ import annotations

import ml_collections

from configs import common

# The study's columns, in the order of its table: key, label, classifier mode,
# freeze the encoder, fresh (not pretrained) encoder.
COLUMNS = (
    ('no_pretrain', 'No pretrain', 'fine_tune', False, True),
    ('mlp_tune', 'MLP + fine-tune', 'fine_tune', False, False),
    ('mlp_frozen', 'MLP frozen', 'fine_tune', True, False),
    ('linear_tune', 'Linear + fine-tune', 'probing', False, False),
    ('linear_frozen', 'Linear frozen', 'probing', True, False),
)

# The study's rows: key, label, pretraining config 'file:variant', and the
# reference's CIFAR-100 test top-1 per column above (None: not reported).
ROWS = (
    ('fc_l1', 'FC+l1', 'fc:l1', (.186, .200, .206, .245, .190)),
    ('fc_l2', 'FC+l2', 'fc:l2', (.187, .193, .204, .235, .187)),
    ('conv_192', 'Conv-192', 'conv:192', (.169, .168, .160, .198, .134)),
    ('conv_256', 'Conv-256', 'conv:256', (.191, .191, .210, .214, .186)),
    ('mae', 'MAE', 'mae:seed', (None, .151, .082, .219, .088)),
    # Beyond the study: the masked convolutional UNet its author planned.
    ('masked_unet', 'Masked UNet', 'masked_unet:base', (None, None, None, None, None)),
)

# Rows whose pretraining budget is the FC / Conv one of each variant.
_CONV_BUDGET = ('fc_l1', 'fc_l2', 'conv_192', 'conv_256', 'masked_unet')


def row_config(label: str, pretrain: str, reference: tuple[float | None, ...]
               ) -> ml_collections.ConfigDict:
  """A row: its label, its pretraining config 'file:variant' and the study's top-1 per column."""
  refs = {key: ref for (key, *_), ref in zip(COLUMNS, reference, strict=True) if ref is not None}
  return ml_collections.ConfigDict(dict(
      label=label,                 # the row's name in results.md and report.png
      pretrain=pretrain,           # configs/<file>.py:<variant> of its autoencoder
      num_epochs=0,                # pretraining epochs; 0 = the pretraining config's
      # Fields set in the pretraining config (not the model: the No pretrain
      # column rebuilds the encoder from `pretrain` alone).
      overrides=ml_collections.ConfigDict(),
      reference=ml_collections.ConfigDict(refs),  # the study's top-1 per column key
  ))


def _column(label: str, mode: str, freeze: bool, from_scratch: bool
            ) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(label=label, mode=mode, freeze=freeze,
                                        from_scratch=from_scratch))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: 'seed' (default) | 'quick' | 'cpu' | 'runlocal', plus budget keys."""
  args = common.parse_arg(arg, known=('seed', 'quick', 'cpu', 'runlocal'),
                          pretrain_epochs=0, mae_epochs=0, classifier_epochs=0)
  if args.seed + args.quick + args.cpu > 1:
    raise ValueError("choose one of the variants 'seed', 'quick' and 'cpu'")

  config = ml_collections.ConfigDict()
  config.seed = 0                  # every cell's seed
  config.rows = ','.join(key for key, *_ in ROWS)        # which rows run, in order
  config.columns = ','.join(key for key, *_ in COLUMNS)  # which columns run, in order
  config.knn = True                # a kNN accuracy cell per row
  config.row = ml_collections.ConfigDict({key: row_config(*rest) for key, *rest in ROWS})
  config.column = ml_collections.ConfigDict({key: _column(*rest) for key, *rest in COLUMNS})
  config.classifier = 'seed'       # configs/classifier.py variant of every classifier cell
  config.classifier_epochs = 40    # 0 = the classifier config's
  config.classifier_overrides = ml_collections.ConfigDict()  # fields set in every classifier cell
  config.strip_size = 8            # images per reconstruction strip in report.png

  # Replaces the data block of every cell (augmentation stays each stage's own).
  config.data = common.data_config()
  del config.data['augment']

  if args.quick or args.cpu:
    config.classifier = ''         # ours: AdamW, warmup + cosine, augmentation when tuned
    for key in _CONV_BUDGET:
      config.row[key].num_epochs = 5 if args.quick else 2
    config.classifier_epochs = 5 if args.quick else 1
  if args.quick:
    config.row.mae.pretrain = 'mae:fast'
    config.row.mae.num_epochs = 20
    # The seed MAE warms up for 200 epochs: scale it to the short run.
    config.row.mae.overrides.optim = ml_collections.ConfigDict(dict(warmup_epochs=2))
  if args.cpu:
    # Even the `fast` MAE trains at only ~30-60 images/s on 2 CPU cores (an
    # epoch of 45,000 images would take 15-25 minutes), so this row is the
    # tiny runlocal MAE (width 16, 1 block each, 4x4 patches) on the real
    # images: it shows the row runs end to end, its numbers mean little.
    config.row.mae.pretrain = 'mae:fast,runlocal'
    config.row.mae.num_epochs = 2
    config.row.mae.overrides.update(dict(batch_size=128, log_every_steps=50))
    config.row.mae.overrides.optim = ml_collections.ConfigDict(dict(warmup_epochs=0))
    # One epoch: no room for the default 2 warmup epochs.
    config.classifier_overrides.optim = ml_collections.ConfigDict(dict(warmup_epochs=0))
  if args.runlocal:
    if not (args.seed or args.quick or args.cpu):
      config.row.mae.pretrain = 'mae:fast'
    for row in config.row.values():
      if not row.pretrain.endswith('runlocal'):
        row.pretrain += ',runlocal'
      row.num_epochs = 1
    config.classifier = ','.join(filter(None, (config.classifier, 'runlocal')))
    config.classifier_epochs = 1
    config.data.source = 'fake'
    config.data.fake_train_size = 128
    config.data.fake_test_size = 64
    config.strip_size = 4

  if args.pretrain_epochs:
    for key in _CONV_BUDGET:
      config.row[key].num_epochs = args.pretrain_epochs
  if args.mae_epochs:
    config.row.mae.num_epochs = args.mae_epochs
  if args.classifier_epochs:
    config.classifier_epochs = args.classifier_epochs
  return config
