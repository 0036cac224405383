"""Pieces every mil_jax config shares: the data block, the loop block, variants.

A config file builds its ``ConfigDict`` from these and then sets what is its
own. Variants are comma-separated tokens after the colon of ``--config``:
``configs/mae.py:seed,runlocal`` calls ``get_config('seed,runlocal')``.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, *, known: tuple[str, ...], **keyed) -> ml_collections.ConfigDict:
  """Parses a variant string like ``'seed,runlocal'`` or ``'layers=5,filters=8'``.

  Args:
    arg: the text after ``:`` in ``--config FILE:arg`` (may be empty or None).
    known: bare words the config understands; each becomes a bool field.
    **keyed: ``key=default`` pairs the config understands; a ``key=value``
      token is converted to the type of the default.

  Returns:
    A ConfigDict with one field per known word (True if given) and per key.

  Raises:
    ValueError: for a token that is neither a known word nor a known key; the
      command-line layer reports it as a user error.
  """
  out = ml_collections.ConfigDict({w: False for w in known})
  out.update(keyed)
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if '=' in token:
      key, value = token.split('=', 1)
      if key not in keyed:
        raise ValueError(f'unknown variant key {key!r}; known keys: {sorted(keyed)}')
      try:
        out[key] = type(keyed[key])(value)
      except ValueError:
        raise ValueError(
            f'variant {key}={value!r} is not a {type(keyed[key]).__name__}') from None
    elif token in known:
      out[token] = True
    else:
      raise ValueError(f'unknown variant {token!r}; known variants: {sorted(known)}')
  return out


def data_config(source: str = 'tfds:cifar100') -> ml_collections.ConfigDict:
  """The data block: where images come from and how they are augmented."""
  return ml_collections.ConfigDict(dict(
      source=source,            # 'tfds:<name>' | 'npz:<path>' | 'fake'
      train_split='train',      # TFDS split syntax: 'train[:45000]', 'train[:90%]'
      eval_split='test',
      data_dir='',              # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
      download=True,            # let TFDS download and prepare the data set
      augment=False,            # random crop (4-pixel padding) + horizontal flip
      fake_train_size=2048,     # examples in the 'fake' source's train split
      fake_test_size=512,       # ... and in its test split
      fake_num_classes=10,
  ))


def optim_config(name: str, lr: float, schedule: str, **fields) -> ml_collections.ConfigDict:
  """The optim block: every field ``mil_jax.optim`` reads, defaults for the rest.

  Fields: ``name`` (adam | adamw | sgd; sgd's momentum is ``b1``), ``lr``,
  ``weight_decay``, ``b1``, ``b2``, ``schedule`` (constant | exponential |
  cosine | warmup_cosine), ``warmup_epochs``, ``decay_rate`` (exponential: the
  factor per epoch), ``cosine_steps`` (cosine period in steps, PyTorch's
  T_max; 0 = the whole run), ``grad_clip_norm`` (0 = off).
  """
  optim = ml_collections.ConfigDict(dict(
      name=name, lr=lr, weight_decay=0.0, b1=0.9, b2=0.999, schedule=schedule,
      warmup_epochs=0, decay_rate=1.0, cosine_steps=0, grad_clip_norm=0.0))
  unknown = set(fields) - set(optim.keys())
  if unknown:  # ConfigDict.update would add them silently
    raise ValueError(f'unknown optim fields {sorted(unknown)}')
  optim.update(fields)
  return optim


def speed_config(**fields) -> ml_collections.ConfigDict:
  """The speed block: how a run computes, never what it learns.

  Each 'auto' is decided by ``mil_jax.tuning`` for the platform the run is
  on, and the run's ``config.json`` records the decision. Fields: ``devices``
  (devices of the data mesh), ``cpu_devices`` (what 'auto' takes on a CPU
  split into one device per core: 'all' or a count), ``conv_impl`` ('dots' |
  'xla'), ``attention_chunk_bytes`` (attention weights per chunk; 0: the
  whole batch), ``grad_norm_every`` (steps between gradient norms, counted
  back from each dispatch's last), ``max_in_flight`` (dispatched calls
  unfinished at once; 0: no bound), ``cpu_ynn_fusions`` ('all' | 'no_reduce'
  | 'none': XLA:CPU's YNNPACK fusions).
  """
  speed = ml_collections.ConfigDict(dict(
      devices='auto', cpu_devices='all', conv_impl='auto', attention_chunk_bytes='auto',
      grad_norm_every='auto', max_in_flight='auto', cpu_ynn_fusions='auto'))
  unknown = set(fields) - set(speed.keys())
  if unknown:
    raise ValueError(f'unknown speed fields {sorted(unknown)}')
  for name, value in fields.items():  # a count where 'auto' stood: a new field of its type
    del speed[name]
    speed[name] = value
  return speed


def loop_config(config: ml_collections.ConfigDict, *, batch_size: int, num_epochs: int,
                steps_per_dispatch: int) -> None:
  """Sets the fields of the training loop that every config has.

  ``steps_per_dispatch`` train steps run in one jitted call (``lax.scan``):
  short steps would otherwise wait on Python's dispatch, and every call of a
  big step faults in its scratch memory afresh on the CPU; results do not
  depend on it (``python -m mil_jax.bench`` shows the speed).
  """
  config.seed = 0
  config.batch_size = batch_size            # global batch, split over all devices
  config.num_epochs = num_epochs
  config.steps_per_dispatch = steps_per_dispatch  # train steps per jitted call (lax.scan)
  config.log_every_steps = 50
  config.eval_every_epochs = 1              # validation every N epochs, and after the last
  # The latest checkpoint is saved in the background this often (a hard kill
  # loses at most that much training; 0 turns a bound off), on SIGINT/SIGTERM
  # and at the end; a state whose validation loss is the best yet is kept and
  # written just before the next of those saves.
  config.checkpoint_every_secs = 300.0
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 1               # latest ones kept, besides the best
  config.speed = speed_config()             # how, not what: resolved by mil_jax.tuning


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a seconds-long smoke run on a CPU on synthetic data."""
  config.data.source = 'fake'
  config.data.fake_train_size = 256
  config.data.fake_test_size = 64
  config.batch_size = 32
  config.num_epochs = 2
  config.log_every_steps = 4
