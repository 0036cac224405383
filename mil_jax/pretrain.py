"""The pretraining stage: an autoencoder trained to reconstruct its input.

``train_and_evaluate(config, workdir)`` trains ``config.model`` with
``config.loss`` on ``config.data``, evaluates reconstruction each epoch,
checkpoints (latest and best) under ``workdir/checkpoints``, resumes from
there when rerun, and leaves ``metrics.jsonl``, TensorBoard events,
``loss.png`` and ``reconstructions.png`` in ``workdir``.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mil_jax import config_checks, losses, models, paths, report, sharding, trainer, tuning
from mil_jax import input_pipeline as ip
from mil_jax import workdir as workdir_lib
from mil_jax.metric_writers import read_metrics
from mil_jax.models import masking
from mil_jax.optim import make_optimizer

NUM_SHOWN = 8  # images in reconstructions.png


def shown_reconstruction(config: ml_collections.ConfigDict, images: jax.Array,
                         reconstruction: jax.Array, aux: dict[str, jax.Array]) -> jax.Array:
  """What a user sees as the reconstruction, in [-1, 1].

  For a masking model (the MAE, the masked UNet), the visible patches are the
  input's own: only the removed ones are predictions (as the MAE paper shows
  them).
  """
  if 'mask' in aux:
    p = config.model.patch_size
    mask = aux['mask'][..., None]
    patches = (masking.patchify(images, p) * (1 - mask)
               + masking.patchify(reconstruction, p) * mask)
    reconstruction = masking.unpatchify(patches, p, *images.shape[1:3])
  return jnp.clip(reconstruction, -1.0, 1.0)


def psnr_of(mse: jax.Array) -> jax.Array:
  """PSNR in dB of images in [-1, 1] from their mean squared error [B] -> [B].

  Pixels span 2: 10 log10(2^2 / MSE), the same as on [0, 1].
  """
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def make_task(config: ml_collections.ConfigDict, model: nn.Module
              ) -> tuple[trainer.LossFn, trainer.EvalFn]:
  """The loss and evaluation functions of autoencoder pretraining."""

  def apply(params, x, train, rngs):
    return model.apply({'params': params}, x, train=train, rngs=rngs)

  def loss_fn(params, model_state, images, labels, rngs):
    del labels
    x = ip.prepare_batch(rngs['augment'], images, augment_images=config.data.augment)
    reconstruction, aux = apply(params, x, True, rngs)
    loss, _ = losses.pretrain_loss(config, x, reconstruction, aux)
    return loss, ({}, model_state)

  def eval_fn(params, model_state, images, labels, rng):
    del model_state, labels
    x = ip.to_float(images)
    reconstruction, aux = apply(params, x, False, {'masking': rng})
    _, per_example = losses.pretrain_loss(config, x, reconstruction, aux)
    shown = shown_reconstruction(config, x, reconstruction, aux)
    err = jnp.square(shown - x)
    mse = jnp.mean(err, axis=(1, 2, 3))
    metrics = {'loss': per_example, 'mse': mse, 'psnr': psnr_of(mse)}
    if 'mask' in aux:
      # The visible pixels above are the input's own; this scores the filled-in ones alone.
      removed = masking.pixel_mask(aux['mask'], config.model.patch_size, *x.shape[1:3])
      count = jnp.maximum(jnp.sum(removed, axis=(1, 2, 3)) * x.shape[-1], 1.0)
      metrics['masked_psnr'] = psnr_of(jnp.sum(err * removed, axis=(1, 2, 3)) / count)
    return metrics

  return loss_fn, eval_fn


def init_params(config: ml_collections.ConfigDict, model: nn.Module,
                mesh: jax.sharding.Mesh) -> Any:
  """Model parameters, created directly replicated on the mesh."""
  return trainer.init_variables(model, config.seed, mesh)['params']


def reconstruction_program(config: ml_collections.ConfigDict, model: nn.Module
                           ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """``run(params, uint8 images)``, jitted: ``{'original', 'reconstruction'}`` in
  [-1, 1] and, for a model that masks, ``'masked input'`` (its masked patches grey)."""

  @jax.jit
  def run(params, images):
    x = ip.to_float(images)
    rng = trainer.eval_rng(config.seed)
    reconstruction, aux = model.apply({'params': params}, x, train=False, rngs={'masking': rng})
    rows = {'original': x, 'reconstruction': shown_reconstruction(config, x, reconstruction, aux)}
    if 'mask' in aux:
      p = config.model.patch_size
      grey = masking.patchify(x, p) * (1 - aux['mask'][..., None])
      rows['masked input'] = masking.unpatchify(grey, p, *x.shape[1:3])
    return rows

  return run


def save_reconstructions(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
                         data: ip.DeviceSplit, path: pathlib.Path) -> None:
  """``reconstructions.png``: originals over reconstructions (MAE: + masked input).

  Every process of a run calls it (the program spans their devices); process 0 writes.
  """
  count = min(NUM_SHOWN, len(data))
  rows = jax.device_get(reconstruction_program(config, model)(params, data.images[:count]))
  if jax.process_index() != 0:
    return
  order = [k for k in ('original', 'masked input', 'reconstruction') if k in rows]
  report.plot_image_rows([(k, np.asarray(rows[k])) for k in order], path)


def build_trainer(config: ml_collections.ConfigDict, model: nn.Module,
                  train_data: ip.DeviceSplit, eval_data: ip.DeviceSplit,
                  mesh: jax.sharding.Mesh, speed: tuning.Speed | None = None
                  ) -> tuple[trainer.Trainer, Any]:
  """The pretraining stage's trainer for ``model``, and its initial params.

  ``speed``: the run's resolved settings (None: ``config.speed`` resolved for ``mesh``).
  """
  params = init_params(config, model, mesh)
  spe = max(ip.steps_per_epoch(len(train_data), config.batch_size), 1)
  tx, schedule = make_optimizer(config.optim, params, steps_per_epoch=spe,
                                total_steps=spe * config.num_epochs)
  loss_fn, eval_fn = make_task(config, model)
  loop = trainer.Trainer(config=config, mesh=mesh, loss_fn=loss_fn, eval_fn=eval_fn, tx=tx,
                         schedule=schedule, train_data=train_data, eval_data=eval_data,
                         speed=speed)
  return loop, params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       overwrite: bool = False) -> dict[str, float]:
  """Pretrains ``config.model`` and returns the final validation metrics.

  Every input is checked (config values, data, the traced programs) before
  ``workdir`` is created, replaced or resumed.

  Args:
    config: a pretraining config (``configs/fc.py``, ``conv.py``, ``mae.py``);
      its paths (``npz:`` sources, ``data.data_dir``) may be relative to the
      current directory, and are recorded absolute.
    workdir: where checkpoints, metrics and pictures go (relative paths and
      ``~`` work); rerunning with the same workdir resumes, or extends a
      finished run to a larger ``num_epochs``.
    overwrite: replace a run found in ``workdir``.

  Returns:
    ``{'eval/loss', 'eval/mse', 'eval/psnr'}`` of the final parameters.
  """
  sharding.initialize_distributed()
  paths.resolve_data_paths(config.data)
  config_checks.check_pretraining(config)
  speed = tuning.resolve(config.speed, batch_size=config.batch_size,
                         steps_per_dispatch=config.steps_per_dispatch,
                         architecture=config.model.name)
  tuning.record(config, speed)
  mesh = sharding.training_mesh(speed.devices)
  sharding.check_batch_size(config.batch_size, mesh)
  model = models.build_autoencoder(config.model, speed.model_settings(config.model))
  train_split = ip.load_split(config.data, config.data.train_split)
  eval_split = ip.load_split(config.data, config.data.eval_split)

  train_data = ip.DeviceSplit.create(train_split, mesh)
  eval_data = ip.DeviceSplit.create(eval_split, mesh)
  loop, params = build_trainer(config, model, train_data, eval_data, mesh, speed)
  state = loop.init_state(params)
  loop.check_programs(state)
  with workdir_lib.claim(workdir, config, overwrite=overwrite) as workdir:
    state, final = loop.run(state, workdir, meta={'stage': 'pretrain',
                                                  'config': config.to_dict()})
    # A finished run's rerun keeps its pictures (and starts no plotting).
    if jax.process_index() == 0 and report.to_draw(workdir / 'loss.png', loop.trained):
      report.plot_loss(read_metrics(workdir), workdir / 'loss.png')
    if report.to_draw(workdir / 'reconstructions.png', loop.trained):
      # Every process: the reconstructions are computed over the mesh together.
      save_reconstructions(config, model, state.params, eval_data,
                           workdir / 'reconstructions.png')
  return final
