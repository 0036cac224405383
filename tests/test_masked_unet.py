"""Tests of the masked UNet: sizes, the mask, what the network sees, features, commands."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import masked_unet as unet_config
from mil_jax import models
from mil_jax.errors import UserError
from mil_jax.models import conv_ae, masking

from .conftest import copy_repo, latest_params, run_command

RNGS = {'params': jax.random.key(0), 'masking': jax.random.key(1)}
IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


@pytest.fixture(autouse=True, scope='module')
def _quick_compiles():
  """XLA:CPU optimization passes take most of these tiny tests' time."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


def _tiny(**overrides) -> ml_collections.ConfigDict:
  cfg = unet_config.get_config('runlocal').model
  cfg.update(dict(num_layers=3, start_filters=4))
  cfg.update(overrides)
  return cfg


def _images(batch: int = 3, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)


def _count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _random_params(cfg, seed: int = 0):
  """Random values in the param shapes (no init to compile); the fill value is nonzero."""
  shapes = jax.eval_shape(lambda x: models.build_autoencoder(cfg).init(RNGS, x, train=False),
                          IMAGES)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.2, size=s.shape), s.dtype),
                      shapes)


def _expected_sizes(layers: int, factor: int, filters: int, fill: bool) -> tuple[int, int, int]:
  """(params, encoder params, features) counted from the architecture's description."""
  widths = [filters * factor ** i for i in range(layers)]
  conv = lambda cin, cout: 16 * cin * cout + cout   # 4x4 kernel and bias
  encoder = sum(conv(cin, c) for cin, c in zip([3, *widths], widths))
  encoder += sum(2 * c for c in widths[1:]) + 3 * fill   # LayerNorm scale and bias, fill value
  decoder, cin = 0, widths[-1]
  for c in reversed(widths[:-1]):
    decoder += conv(cin, c) + 2 * c
    cin = 2 * c                                         # joined by the skip of that size
  decoder += conv(cin, 3)
  return encoder + decoder, encoder, widths[-1]


@pytest.mark.parametrize('variant, fill, sizes', [
    ('base', 'learned', (4, 2, 8)), ('large', 'learned', (4, 2, 16)), ('base', 'zero', (4, 2, 8)),
])
def test_param_tree_sizes_and_shapes(variant, fill, sizes):
  cfg = unet_config.get_config(variant).model
  cfg.mask_fill = fill
  ae, enc = models.build_autoencoder(cfg), models.build_encoder(cfg)
  variables = jax.eval_shape(lambda x: ae.init(RNGS, x, train=True), IMAGES)
  params = variables['params']
  total, encoder, features = _expected_sizes(*sizes, fill == 'learned')
  assert set(params) == {'encoder', 'decoder'}
  assert (_count(params), _count(params['encoder'])) == (total, encoder)
  assert ('mask_fill' in params['encoder']) == (fill == 'learned')
  # The standalone encoder has the autoencoder's encoder tree, fill value included.
  alone = jax.eval_shape(lambda x: enc.init(RNGS, x, train=False), IMAGES)['params']
  shape_of = lambda tree: jax.tree.map(lambda s: (s.shape, s.dtype), tree)
  assert shape_of(alone) == shape_of(params['encoder'])
  recon, aux = jax.eval_shape(lambda v, x: ae.apply(v, x, train=True, rngs=RNGS), variables,
                              IMAGES)
  assert (recon.shape, recon.dtype) == ((2, 32, 32, 3), jnp.float32)
  assert set(aux) == {'mask'} and aux['mask'].shape == (2, 64)
  encoded = jax.eval_shape(lambda v, x: ae.apply(v, x, method='encode'), variables, IMAGES)
  assert encoded.shape == (2, features)


def test_base_variant_is_near_the_conv_autoencoders_size():
  conv192, conv256 = 49_347, 87_299      # reference/SEED.md
  _, base = models.summarize(unet_config.get_config('base').model)
  _, large = models.summarize(unet_config.get_config('large').model)
  assert conv192 < base['params'] < 1.2 * conv256
  assert large['params'] > 3 * base['params'] and large['feature_dim'] > base['feature_dim']


def test_summary_command_reports_the_unet(tmp_path):
  out = run_command(['-m', 'mil_jax.models', '--config', 'configs/masked_unet.py'],
                    cwd=copy_repo(tmp_path), env={'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  total, encoder, features = _expected_sizes(4, 2, 8, True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {
      'model': 'masked_unet', 'params': total, 'encoder_params': encoder, 'feature_dim': features}


def test_pixel_mask_spreads_each_patch_over_its_pixels():
  _, mask, _ = masking.random_masking(jax.random.key(3), 2, 16, 0.5)   # 8x8 patches of 32x32
  got = np.asarray(masking.pixel_mask(mask, 8, 32, 32))
  rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
  want = np.asarray(mask)[:, (rows // 8) * 4 + cols // 8]
  np.testing.assert_array_equal(got[..., 0], want)


@pytest.mark.parametrize('patch_size, mask_ratio', [(4, 0.6), (8, 0.5), (2, 0.75), (4, 0.0)])
def test_mask_covers_exactly_the_configured_share(patch_size, mask_ratio):
  cfg = _tiny(patch_size=patch_size, mask_ratio=mask_ratio)
  ae = models.build_autoencoder(cfg)
  variables = _random_params(cfg)
  masks = jax.jit(lambda v, x, key: ae.apply(v, x, train=True, rngs={'masking': key})[1]['mask'])
  n = (32 // patch_size) ** 2
  removed = n - max(1, round(n * (1 - mask_ratio)))
  first = np.asarray(masks(variables, _images(8), jax.random.key(0)))
  assert first.shape == (8, n) and set(np.unique(first)) <= {0.0, 1.0}
  np.testing.assert_array_equal(first.sum(axis=1), np.full(8, removed))
  if removed:  # a different mask per image and per key
    assert len({tuple(m) for m in first}) == 8
    assert not np.array_equal(first, masks(variables, _images(8), jax.random.key(1)))


@pytest.mark.parametrize('fill', ['learned', 'zero'])
def test_network_sees_the_fill_value_in_the_removed_patches_only(fill):
  """With a mask drawn, the UNet's output equals its unmasked output on the filled-in image."""
  cfg = _tiny(mask_fill=fill)
  variables = _random_params(cfg)
  unmasked = models.build_autoencoder(_tiny(mask_fill=fill, mask_ratio=0.0))
  ae = models.build_autoencoder(cfg)

  @jax.jit
  def run(variables, x, key):
    return ae.apply(variables, x, train=True, rngs={'masking': key})

  x = _images(3)
  recon, aux = run(variables, x, jax.random.key(7))
  removed = np.asarray(aux['mask'])[:, (np.arange(32)[:, None] // 4) * 8 + np.arange(32) // 4]
  value = (np.asarray(variables['params']['encoder']['mask_fill']) if fill == 'learned'
           else np.zeros(3, np.float32))
  assert np.abs(value).min() > 0.01 or fill == 'zero'
  filled = np.where(removed[..., None] == 1, value, x)
  want, _ = jax.jit(lambda v, x: unmasked.apply(v, x, train=True))(variables, filled)
  np.testing.assert_allclose(recon, want, rtol=1e-5, atol=1e-5)
  # Noise in the removed pixels changes nothing, in a visible patch it does.
  noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  hidden, _ = run(variables, x + noise * removed[..., None], jax.random.key(7))
  np.testing.assert_allclose(hidden, recon, rtol=1e-5, atol=1e-5)
  seen, _ = run(variables, x + noise * (1 - removed[..., None]), jax.random.key(7))
  assert np.abs(np.asarray(seen) - np.asarray(recon)).max() > 1e-3


def test_encode_is_deterministic_unmasked_and_the_pooled_bottleneck():
  cfg = _tiny()
  variables = _random_params(cfg)
  ae, enc = models.build_autoencoder(cfg), models.build_encoder(cfg)
  # The Conv autoencoder's encoder has the same down path: its flattened last
  # map, averaged over positions, is what the UNet's features must be.
  conv = conv_ae.ConvEncoder(num_layers=3, channel_factor=2, start_filters=4)
  conv_params = {k: v for k, v in variables['params']['encoder'].items() if k != 'mask_fill'}

  @jax.jit
  def run(variables, x):
    return (ae.apply(variables, x, method='encode'),
            ae.apply(variables, x, method='encode', rngs={'masking': jax.random.key(1)}),
            ae.apply(variables, x, method='encode', rngs={'masking': jax.random.key(2)}),
            enc.apply({'params': variables['params']['encoder']}, x, train=False),
            conv.apply({'params': conv_params}, x, train=False))

  x = _images(3)
  f1, f2, f3, alone, flat = run(variables, x)
  assert f1.shape == (3, 16)
  np.testing.assert_array_equal(f1, f2)
  np.testing.assert_array_equal(f1, f3)
  np.testing.assert_array_equal(f1, alone)
  want = np.asarray(flat).reshape(3, 4 * 4, 16).mean(axis=1)
  np.testing.assert_allclose(f1, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_forward_keeps_float32_params():
  cfg = _tiny(dtype='bfloat16')
  ae = models.build_autoencoder(cfg)
  shapes = jax.eval_shape(lambda x: ae.init(RNGS, x, train=False), IMAGES)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = _random_params(cfg)

  @jax.jit
  def run(variables, x):
    recon, _ = ae.apply(variables, x, train=True, rngs={'masking': jax.random.key(0)})
    return recon, ae.apply(variables, x, method='encode')

  recon, features = run(variables, _images(2))
  assert recon.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(recon)))
  assert features.dtype == jnp.bfloat16 and features.shape == (2, 16)


@pytest.mark.parametrize('overrides, words', [
    ({'patch_size': 5}, ['patch_size', '32']),
    ({'mask_ratio': 1.0}, ['mask_ratio']),
    ({'mask_fill': 'noise'}, ['mask_fill', 'learned', 'zero']),
    ({'num_layers': 6}, ['num_layers']),
])
def test_bad_model_config_is_a_user_error(overrides, words):
  cfg = _tiny(**overrides)
  for build in (models.build_autoencoder, models.build_encoder):
    with pytest.raises(UserError) as e:
      build(cfg)
    for word in words:
      assert word in str(e.value)


def test_pretrain_and_classifiers_from_the_command_line(tmp_path):
  """--type masked_unet pretrains; the probe loads its encoder; --from_scratch builds one."""
  tmp_path = copy_repo(tmp_path / 'repo')
  small = ['--config.data.source=fake', '--config.data.fake_train_size=64',
           '--config.data.fake_test_size=32', '--config.num_epochs=1']
  env = {'JAX_PLATFORMS': 'cpu'}
  out = run_command(['train_pretrain.py', '--type', 'masked_unet', *small,
                     '--workdir', 'runs/pre'], cwd=tmp_path, env=env, timeout=900)
  pre = tmp_path / 'runs' / 'pre'
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((pre / 'config.json').read_text())['model']['name'] == 'masked_unet'
  final = [json.loads(ln) for ln in (pre / 'metrics.jsonl').read_text().splitlines()][-1]
  # Visible pixels are the input's own in the shown reconstruction, so its
  # error is the removed pixels' error times their share (38 of 64 patches).
  assert final['eval/psnr'] - final['eval/masked_psnr'] == pytest.approx(
      10 * np.log10(64 / 38), abs=1e-3)
  assert (pre / 'reconstructions.png').stat().st_size > 0
  _, pretrained = latest_params(pre)

  out = run_command(['train_classifier.py', '--mode', 'probing', '--pretrained_path', 'runs/pre',
                     '--config', 'configs/classifier.py:runlocal', *small,
                     '--workdir', 'runs/probe'], cwd=tmp_path, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'encoder: masked_unet from' in out.stdout
  accuracy = [json.loads(ln) for ln in (tmp_path / 'runs' / 'probe' / 'metrics.jsonl')
              .read_text().splitlines()][-1]['eval/accuracy']
  assert 0.0 <= accuracy <= 1.0
  _, probe = latest_params(tmp_path / 'runs' / 'probe')
  for a, b in zip(jax.tree.leaves(probe['encoder']), jax.tree.leaves(pretrained['encoder'])):
    np.testing.assert_array_equal(a, b)   # loaded, and frozen

  out = run_command(['train_classifier.py', '--mode', 'fine_tune', '--from_scratch', '--type',
                     'masked_unet:runlocal', '--config', 'configs/classifier.py:runlocal',
                     *small, '--workdir', 'runs/scratch'], cwd=tmp_path, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'a fresh masked_unet:runlocal encoder' in out.stdout
  assert 'eval/accuracy' in (tmp_path / 'runs' / 'scratch' / 'metrics.jsonl').read_text()


@pytest.mark.parametrize('args, message', [
    (['--type', 'unet'], "unknown --type 'unet'"),
    (['--config', 'configs/masked_unet.py:huge'], "unknown variant 'huge'"),
    (['--config', 'configs/masked_unet.py:runlocal', '--config.model.mask_fill=noise'],
     'mask_fill'),
    (['--config', 'configs/masked_unet.py:runlocal', '--config.model.patch_size=5'],
     'patch_size 5'),
])
def test_command_line_mistakes_exit_2(tmp_path, args, message):
  tmp_path = copy_repo(tmp_path / 'repo')
  out = run_command(['train_pretrain.py', *args, '--workdir', 'runs/w'], cwd=tmp_path,
                    env={'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert not (tmp_path / 'runs').exists()
