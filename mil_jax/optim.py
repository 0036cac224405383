"""Optimizers, learning-rate schedules and freezing, from a config's ``optim`` block.

Freezing is a partition of the parameters by regex rules over their paths
(``encoder/.*``): frozen leaves go through ``optax.set_to_zero()``, so they get
no update, no optimizer state and no weight decay. Layer-wise learning-rate
decay is another partition by path, each part's update scaled by a constant
(``layer_decay_rules``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mil_jax.errors import UserError

TRAIN, FREEZE = 'train', 'freeze'


def make_schedule(cfg: ml_collections.ConfigDict, *, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """The learning rate per step, advancing every step.

  Schedules (``cfg.schedule``):
    ``constant``       ``cfg.lr`` throughout.
    ``exponential``    ``cfg.lr * cfg.decay_rate ** epoch`` (stepped each epoch).
    ``cosine``         ``cfg.lr * (1 + cos(pi * t / T)) / 2`` with
                       ``T = cfg.cosine_steps`` (0: the whole run); past ``T`` it
                       rises again, as PyTorch's ``CosineAnnealingLR`` does.
    ``warmup_cosine``  linear warmup over ``cfg.warmup_epochs`` epochs from 0,
                       then cosine decay to 0 at the end of the run.
  """
  lr = cfg.lr
  if cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if cfg.schedule == 'exponential':
    return optax.exponential_decay(lr, transition_steps=steps_per_epoch,
                                   decay_rate=cfg.decay_rate, staircase=True)
  if cfg.schedule == 'cosine':
    period = cfg.cosine_steps or total_steps
    return lambda step: lr * 0.5 * (1.0 + jnp.cos(math.pi * step / period))
  if cfg.schedule == 'warmup_cosine':
    warmup = min(cfg.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  raise UserError(f'unknown optim.schedule {cfg.schedule!r}; use constant, exponential, '
                  'cosine or warmup_cosine.')


def _decay_mask(params: Any) -> Any:
  # Weight decay on matrices and kernels only, never on biases, norms or tokens.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_base_optimizer(cfg: ml_collections.ConfigDict,
                        schedule: optax.Schedule) -> optax.GradientTransformation:
  """``cfg.name`` (adam | adamw | sgd) at ``schedule``, after optional gradient clipping.

  ``sgd`` uses ``cfg.b1`` as its momentum (0: plain SGD).
  """
  if cfg.name == 'sgd':
    opt = optax.sgd(schedule, momentum=cfg.b1 or None)
  elif cfg.name == 'adam':
    opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == 'adamw':
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  else:
    raise UserError(f'unknown optim.name {cfg.name!r}; use adam, adamw or sgd.')
  if cfg.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt


# Row length of the blocked sums of squares on XLA:CPU (``global_norm``).
CPU_NORM_BLOCK = 32


def _sum_of_squares(x: jax.Array, block: int) -> jax.Array:
  s = jnp.square(x.astype(jnp.float32)).ravel()
  while s.size > block:
    s = jnp.pad(s, (0, -s.size % block)).reshape(-1, block).sum(axis=1)
  return jnp.sum(s)


def global_norm(tree: Any, *, block: int = CPU_NORM_BLOCK) -> jax.Array:
  """The L2 norm of all leaves of ``tree`` together, as ``optax.global_norm``,
  for XLA:CPU (the trainer uses optax's elsewhere).

  The squares are summed in rows of ``block`` (> 1) values, level by level,
  rather than in one reduction per leaf. XLA:CPU rewrites a long
  reduction into a tree of reduce-windows that cannot fuse the squaring, so the
  squares are written out and read back; rows of 32 XLA leaves as one fused
  pass per level, several times faster on the FC autoencoder's gradients
  (docs/performance.md). The value is the same up to the summation order.
  """
  if block < 2:
    raise ValueError(f'global_norm needs rows of at least 2 values, not {block}')
  return jnp.sqrt(sum(_sum_of_squares(x, block) for x in jax.tree.leaves(tree)))


def path_str(path: tuple[Any, ...]) -> str:
  """A pytree key path as ``'encoder/Dense_0/kernel'``."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def partition_labels(params: Any, rules: Sequence[tuple[str, str]]) -> Any:
  """One label per parameter: that of the first rule whose regex matches its path.

  Args:
    params: the parameter pytree.
    rules: ``(regex, label)`` pairs, e.g. ``[('encoder/.*', 'freeze'), ('.*', 'train')]``;
      a regex must match the whole path.

  Raises:
    ValueError: a parameter that no rule matches, or a rule that matches no
      parameter (almost always a typo in a path).
  """
  compiled = [(re.compile(rx), label) for rx, label in rules]
  used = [False] * len(compiled)

  def label_of(path, _):
    name = path_str(path)
    for i, (rx, label) in enumerate(compiled):
      if rx.fullmatch(name):
        used[i] = True
        return label
    raise ValueError(f'parameter {name!r} is matched by no rule of {[r for r, _ in rules]}')

  labels = jax.tree_util.tree_map_with_path(label_of, params)
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise ValueError(f'rules {unused} match no parameter')
  return labels


def layer_decay_rules(depth: int, decay: float,
                      encoder: str = 'encoder') -> list[tuple[str, float]]:
  """Learning-rate scales of a ViT classifier's parameters by depth (MAE fine-tuning).

  Layer ids as in the MAE paper's code: the patch embedding, cls token and
  position embedding are layer 0, transformer block ``i`` is layer ``i + 1``,
  everything else (the final norm, the head) layer ``depth + 1``. A parameter
  of layer ``l`` trains at ``lr * decay ** (depth + 1 - l)``: the head at the
  full rate, each block below it ``decay`` times slower than the one above.
  Paths are those of ``models.mae.MAEEncoder`` under ``encoder``.

  Returns:
    ``(regex, scale)`` rules for ``make_optimizer(lr_scales=...)``; the last
    one, ``'.*'``, catches the top layer.
  """
  top = depth + 1
  rules = [(f'{encoder}/(patch_embed|cls_token|pos_embedding)(/.*)?', decay ** top)]
  rules += [(f'{encoder}/transformer/block_{i}/.*', decay ** (top - (i + 1)))
            for i in range(depth)]
  return [*rules, ('.*', 1.0)]


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, *, steps_per_epoch: int,
                   total_steps: int, freeze: Sequence[str] = (),
                   lr_scales: Sequence[tuple[str, float]] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for ``params``, with the parameters matching ``freeze`` frozen.

  Args:
    cfg: the config's ``optim`` block.
    params: the parameters (only their paths are read).
    steps_per_epoch: optimizer steps per epoch.
    total_steps: optimizer steps in the whole run.
    freeze: regexes over parameter paths whose leaves are not trained.
    lr_scales: ``(regex, scale)`` rules (the first match of a path wins, every
      path must match one): each parameter's whole update, weight decay
      included, is multiplied by its scale, which is a learning rate of
      ``scale * lr`` (``layer_decay_rules``).

  Returns:
    ``(optimizer, schedule)``.
  """
  schedule = make_schedule(cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  opt = make_base_optimizer(cfg, schedule)
  if freeze:
    rules = [(rx, FREEZE) for rx in freeze] + [('.*', TRAIN)]
    labels = partition_labels(params, rules)
    opt = optax.multi_transform({TRAIN: opt, FREEZE: optax.set_to_zero()}, labels)
  if lr_scales:
    # After the whole optimizer, so that gradient clipping and Adam's moments
    # see every gradient unscaled, as with per-group learning rates in PyTorch.
    labels = partition_labels(params, [(rx, str(i)) for i, (rx, _) in enumerate(lr_scales)])
    scales = {str(i): optax.scale(scale) for i, (_, scale) in enumerate(lr_scales)}
    opt = optax.chain(opt, optax.multi_transform(scales, labels))
  return opt, schedule
