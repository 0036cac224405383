"""Every pretraining config and variant loads, is complete and builds its model."""
from __future__ import annotations

import importlib
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from mil_jax import models

REPO = pathlib.Path(__file__).resolve().parents[1]

# (config file, variant, expected feature dim)
CASES = [
    ('fc', None, 384),
    ('fc', 'l2', 384),
    ('fc', 'l1', 384),
    ('fc', 'l1,runlocal', 16),
    ('conv', None, 192),
    ('conv', '192', 192),
    ('conv', '256', 256),
    ('conv', '256,runlocal', 256),
    ('conv', 'layers=4,factor=2,filters=6', 192),
    ('conv', 'layers=4,factor=3,filters=6', 2 * 2 * 162),
    ('conv', 'layers=5,factor=2,filters=8', 1 * 1 * 128),
    ('conv', 'layers=3,factor=2,filters=16', 4 * 4 * 64),
    ('mae', None, 192),
    ('mae', 'seed', 192),
    ('mae', 'notebook', 192),
    ('mae', 'fast', 192),
    ('mae', 'seed,runlocal', 16),
    ('mae', 'fast,runlocal', 16),
    ('masked_unet', None, 64),
    ('masked_unet', 'base', 64),
    ('masked_unet', 'large', 128),
    ('masked_unet', 'runlocal', 64),
    ('masked_unet', 'large,runlocal', 128),
]
LOOP_FIELDS = {'seed', 'batch_size', 'num_epochs', 'steps_per_dispatch', 'log_every_steps',
               'eval_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints'}
OPTIM_FIELDS = {'name', 'lr', 'weight_decay', 'b1', 'b2', 'schedule', 'warmup_epochs',
                'decay_rate', 'cosine_steps', 'grad_clip_norm'}


def _load(name: str, variant: str | None) -> ml_collections.ConfigDict:
  return importlib.import_module(f'configs.{name}').get_config(variant)


@pytest.mark.parametrize('name, variant, feature_dim', CASES)
def test_config_is_complete_and_builds(name, variant, feature_dim):
  config = _load(name, variant)
  assert LOOP_FIELDS | {'loss', 'data', 'model', 'optim'} <= set(config)
  assert config.loss in ('l2', 'l1', 'masked_l2', 'masked_image_l2')
  assert config.data.source
  assert config.model.name == name
  assert config.model.dtype == 'float32'
  assert set(config.optim) == OPTIM_FIELDS
  assert config.optim.name in ('adam', 'adamw')
  assert config.optim.schedule in ('constant', 'exponential', 'cosine', 'warmup_cosine')
  assert config.optim.warmup_epochs < config.num_epochs
  if config.optim.name == 'adam':
    assert config.optim.weight_decay == 0.0

  ae = models.build_autoencoder(config.model)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  rngs = {'params': jax.random.key(0), 'masking': jax.random.key(1)}
  variables = jax.eval_shape(lambda x: ae.init(rngs, x, train=True), images)
  assert set(variables['params']) == {'encoder', 'decoder'}
  recon, aux = jax.eval_shape(lambda v, x: ae.apply(v, x, train=True, rngs=rngs),
                              variables, images)
  assert recon.shape == (2, 32, 32, 3)
  assert ('pred_patches' in aux) == (config.loss == 'masked_l2')
  assert ('mask' in aux) == (config.loss in ('masked_l2', 'masked_image_l2'))
  features = jax.eval_shape(lambda v, x: ae.apply(v, x, method='encode'), variables, images)
  assert features.shape == (2, feature_dim)


@pytest.mark.parametrize('name, variant', [(n, v) for n, v, _ in CASES if v and 'runlocal' in v])
def test_runlocal_is_a_tiny_run_on_fake_data(name, variant):
  config = _load(name, variant)
  assert config.data.source == 'fake'
  assert config.num_epochs <= 2 and config.batch_size <= 32
  ae = models.build_autoencoder(config.model)
  variables = jax.eval_shape(
      lambda x: ae.init({'params': jax.random.key(0), 'masking': jax.random.key(1)}, x,
                        train=False), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert sum(x.size for x in jax.tree.leaves(variables)) < 500_000


def test_variants_set_what_they_say():
  assert _load('fc', None).loss == 'l2'
  assert _load('fc', 'l1').loss == 'l1'
  assert _load('conv', '256').model.start_filters == 8
  assert _load('conv', None).optim.cosine_steps == 1562
  sweep = _load('conv', 'layers=5,factor=3,filters=4').model
  assert (sweep.num_layers, sweep.channel_factor, sweep.start_filters) == (5, 3, 4)
  assert (_load('mae', 'notebook').model.depth, _load('mae', 'notebook').model.decoder_depth) == (
      8, 4)
  fast = _load('mae', 'fast')
  assert fast.model.patch_size == 4 and fast.model.pos_embedding == 'sincos'
  mae = _load('mae', None)
  assert (mae.model.patch_size, mae.model.depth, mae.model.decoder_depth) == (2, 6, 2)
  assert (mae.optim.name, mae.optim.lr, mae.optim.weight_decay) == ('adamw', 2e-4, 0.05)
  assert (mae.optim.schedule, mae.optim.warmup_epochs) == ('warmup_cosine', 200)
  assert (mae.batch_size, mae.num_epochs, mae.loss) == (128, 2000, 'masked_l2')


@pytest.mark.parametrize('name, variant', [
    ('fc', 'bogus'), ('fc', 'l1,l2'),
    ('conv', '192,256'), ('conv', '256,filters=6'), ('conv', 'layers=x'), ('conv', 'depth=3'),
    ('mae', 'seed,fast'), ('mae', 'large'),
    ('masked_unet', 'base,large'), ('masked_unet', 'huge'), ('masked_unet', 'filters=4'),
])
def test_bad_variants_raise_value_error(name, variant):
  with pytest.raises(ValueError):
    _load(name, variant)


def test_config_file_loads_through_config_flags_locked():
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True)
  flag_values(['prog', f'--config={REPO}/configs/conv.py:256,runlocal'])
  config = flag_values.config
  assert config.model.start_filters == 8 and config.data.source == 'fake'
  config.optim.lr = 1e-3  # existing fields may change; new ones may not
  with pytest.raises(AttributeError):
    config.model.new_field = 1


@pytest.mark.parametrize('name', ['fc', 'conv', 'mae', 'masked_unet'])
def test_config_docstring_gives_command_runtime_and_result(name):
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert f'--config configs/{name}.py' in doc
  assert 'Expected runtime' in doc and 'Expected result' in doc
