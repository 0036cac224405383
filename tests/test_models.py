"""Tests of mil_jax.models: sizes, shapes, masking, the encoder contract."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import conv as conv_config
from configs import fc as fc_config
from configs import mae as mae_config
from mil_jax import models
from mil_jax.errors import UserError
from mil_jax.models import conv_ae, fc_ae, mae, vit

REPO = pathlib.Path(__file__).resolve().parents[1]
RNGS = {'params': jax.random.key(0), 'masking': jax.random.key(1)}


def _count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _images(batch: int = 2, seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (batch, 32, 32, 3), minval=-1.0, maxval=1.0)


def _tiny_mae(**overrides) -> ml_collections.ConfigDict:
  cfg = mae_config.get_config('seed,runlocal').model  # width 16, depth 1, 4x4 patches
  cfg.update(overrides)
  return cfg


@pytest.fixture(autouse=True, scope='module')
def _quick_compiles():
  """XLA:CPU optimization passes take most of these tiny tests' time (3x)."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


def _random_params(model_config):
  """Random values in the autoencoder's param shapes, without running init.

  Initializers are tested on their own; compiling a model's init costs
  seconds on a CPU (random bits), which these forward tests do not need.
  """
  ae = models.build_autoencoder(model_config)
  shapes = jax.eval_shape(lambda x: ae.init(RNGS, x, train=False),
                          jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(scale=0.1, size=s.shape), s.dtype), shapes)


@pytest.fixture(scope='module')
def tiny():
  """Tiny configs and their initialized params, shared by the forward tests."""
  configs = {
      'fc': fc_config.get_config('runlocal').model,
      'conv': conv_config.get_config('192').model,
      'mae': _tiny_mae(),
  }
  return {name: (cfg, _random_params(cfg)) for name, cfg in configs.items()}


def _shapes(model_config, images=None):
  """Abstract params of the autoencoder and of the standalone encoder."""
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32) if images is None else images
  ae = models.build_autoencoder(model_config)
  enc = models.build_encoder(model_config)
  ae_vars = jax.eval_shape(lambda x: ae.init(RNGS, x, train=False), x)
  enc_vars = jax.eval_shape(lambda x: enc.init(RNGS, x, train=False), x)
  return ae, enc, ae_vars, enc_vars


def dense(n_in: int, n_out: int) -> int:
  return n_in * n_out + n_out


def transformer(prefix: tuple, depth: int, width: int, mlp: int) -> dict:
  """Params per submodule of ``vit.Transformer``: pre-LN blocks, then a final LayerNorm."""
  out = {(*prefix, 'norm'): 2 * width}
  for i in range(depth):
    block = (*prefix, f'block_{i}')
    out.update({(*block, 'norm_1'): 2 * width, (*block, 'norm_2'): 2 * width,
                (*block, 'attn', 'qkv'): dense(width, 3 * width),
                (*block, 'attn', 'out'): dense(width, width),
                (*block, 'mlp', 'fc_1'): dense(width, mlp),
                (*block, 'mlp', 'fc_2'): dense(mlp, width)})
  return out


def layers(half: str, name: str, widths: list[int], size) -> dict:
  """``{(half, name_i): size(widths[i], widths[i + 1])}`` along a stack of layers."""
  return {(half, f'{name}_{i}'): size(a, b) for i, (a, b) in enumerate(zip(widths, widths[1:]))}


def expected_sizes(cfg) -> dict:
  """Params per submodule (the path of the module that owns them), from the layer shapes.

  Written from the architecture as the model docstrings describe it, not
  from the modules' code: a missing, extra or resized layer changes a count.
  """
  if cfg.name == 'fc':
    widths = [32 * 32 * 3, *cfg.hidden_dims]
    return {**layers('encoder', 'dense', widths, dense),
            **layers('decoder', 'dense', widths[::-1], dense)}
  if cfg.name == 'conv':
    channels = [cfg.start_filters * cfg.channel_factor ** i for i in range(cfg.num_layers)]
    conv = lambda c_in, c_out: 4 * 4 * c_in * c_out + c_out
    back = [*channels[::-1], 3]
    # A LayerNorm after every encoder conv but the first, after every decoder
    # conv but the last.
    return {**layers('encoder', 'conv', [3, *channels], conv),
            **{('encoder', f'norm_{i}'): 2 * c for i, c in enumerate(channels) if i},
            **layers('decoder', 'conv_transpose', back, conv),
            **{('decoder', f'norm_{i}'): 2 * c for i, c in enumerate(back[1:-1])}}
  tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # the patches and the cls token
  patch = cfg.patch_size ** 2 * 3
  learned = cfg.pos_embedding == 'learned'
  w, dw = cfg.width, cfg.decoder_width
  return {('encoder',): w + learned * tokens * w,  # cls_token, pos_embedding
          ('encoder', 'patch_embed'): dense(patch, w),
          **transformer(('encoder', 'transformer'), cfg.depth, w, cfg.mlp_dim),
          ('decoder',): dw + learned * tokens * dw,  # mask_token, pos_embedding
          ('decoder', 'embed'): dense(w, dw),
          **transformer(('decoder', 'transformer'), cfg.decoder_depth, dw, cfg.decoder_mlp_dim),
          ('decoder', 'pred'): dense(dw, patch)}


def sizes_of(params) -> dict:
  """Params per submodule of an abstract param tree (``jax.eval_shape``)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    owner = tuple(k.key for k in path[:-1])
    out[owner] = out.get(owner, 0) + int(np.prod(leaf.shape))
  return out


VARIANTS = [(fc_config, v) for v in ('l2', 'l1', 'runlocal')] + [
    (conv_config, v) for v in ('192', '256', '256,runlocal', 'layers=4,factor=3,filters=6',
                               'layers=5,factor=2,filters=8', 'layers=3,factor=2,filters=16',
                               'layers=1,factor=2,filters=4')] + [
    (mae_config, v) for v in ('seed', 'notebook', 'fast', 'seed,runlocal', 'fast,runlocal')]


@pytest.mark.parametrize('module,variant', VARIANTS,
                         ids=[f'{m.__name__.split(".")[-1]}:{v}' for m, v in VARIANTS])
def test_param_count_of_every_submodule(module, variant):
  cfg = module.get_config(variant).model
  _, enc, ae_vars, enc_vars = _shapes(cfg)
  got, want = sizes_of(ae_vars['params']), expected_sizes(cfg)
  assert got == want
  assert sizes_of({'encoder': enc_vars['params']}) == {k: v for k, v in want.items()
                                                       if k[0] == 'encoder'}


# Totals the docs state: the reference's PyTorch models (reference/SEED.md) for
# FC and Conv, configs/mae.py's docstring for the MAE (the reference counted
# 3,662,604 / 2,721,024: its decoder had no input projection or final norm).
@pytest.mark.parametrize('model_config, total, encoder, feature_dim', [
    (fc_config.get_config('l2').model, 12_394_368, 6_195_840, 384),
    (conv_config.get_config('192').model, 49_347, 24_738, 192),
    (conv_config.get_config('256').model, 87_299, 43_736, 256),
    (mae_config.get_config('seed').model, 3_700_620, 2_721_600, 192),
], ids=['fc', 'conv192', 'conv256', 'mae'])
def test_documented_param_counts(model_config, total, encoder, feature_dim):
  want = expected_sizes(model_config)
  assert sum(want.values()) == total
  assert sum(v for k, v in want.items() if k[0] == 'encoder') == encoder
  ae, enc, ae_vars, enc_vars = _shapes(model_config)
  params = ae_vars['params']
  assert _count(params) == total and _count(params['encoder']) == encoder
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  assert jax.eval_shape(lambda v, x: ae.apply(v, x, method='encode'), ae_vars, x).shape == (
      2, feature_dim)
  assert jax.eval_shape(lambda v, x: enc.apply(v, x, train=False), enc_vars, x).shape == (
      2, feature_dim)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize('model_config', [
    fc_config.get_config('runlocal').model,
    conv_config.get_config('192').model,
    conv_config.get_config('layers=3,factor=2,filters=16').model,
    _tiny_mae(),
    _tiny_mae(pos_embedding='sincos', pool='mean'),
], ids=['fc', 'conv', 'conv_3_2_16', 'mae', 'mae_sincos'])
def test_standalone_encoder_has_the_autoencoders_encoder_tree(model_config):
  _, _, ae_vars, enc_vars = _shapes(model_config)
  ae_enc = jax.tree.map(lambda s: (s.shape, s.dtype), ae_vars['params']['encoder'])
  alone = jax.tree.map(lambda s: (s.shape, s.dtype), enc_vars['params'])
  assert jax.tree.structure(ae_enc) == jax.tree.structure(alone)
  assert ae_enc == alone


@pytest.mark.parametrize('name', ['fc', 'conv'])
def test_fc_and_conv_reconstruct_in_tanh_range(tiny, name):
  model_config, variables = tiny[name]
  ae = models.build_autoencoder(model_config)
  enc = models.build_encoder(model_config)

  @jax.jit
  def run(variables, x):
    recon, aux = ae.apply(variables, x, train=True)
    features = ae.apply(variables, x, method='encode')
    alone = enc.apply({'params': variables['params']['encoder']}, x, train=False)
    return recon, aux, features, alone

  x = _images(4)
  # Large inputs push the decoder into saturation; outputs must stay in [-1, 1].
  recon, aux, _, _ = run(variables, 50.0 * x)
  assert recon.shape == (4, 32, 32, 3)
  assert recon.dtype == jnp.float32
  assert aux == {}
  assert float(jnp.max(jnp.abs(recon))) <= 1.0
  # Both signs occur: the reference FC decoder (ReLU before tanh) could not go negative.
  recon, _, features, alone = run(variables, x)
  assert float(recon.min()) < 0.0 < float(recon.max())
  # The standalone encoder with the AE's encoder params gives the AE's features.
  np.testing.assert_array_equal(features, alone)


def test_initializers_follow_the_reference():
  x = jnp.zeros((2, 32, 32, 3))
  conv = conv_ae.ConvEncoder(start_filters=8)
  params = jax.jit(lambda key, x: conv.init(key, x, train=False))(jax.random.key(0), x)['params']
  kernel = params['conv_3']['kernel']  # [4, 4, 32, 64]: Xavier-normal, zero bias
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (16 * 32 + 16 * 64)), rtol=0.03)
  np.testing.assert_array_equal(params['conv_3']['bias'], 0.0)
  fc = fc_ae.FCEncoder(hidden_dims=(64,))
  params = jax.jit(lambda key, x: fc.init(key, x, train=False))(jax.random.key(0), x)['params']
  kernel = params['dense_0']['kernel']  # [3072, 64]: torch Linear, U(+-1/sqrt(3072))
  assert float(jnp.max(jnp.abs(kernel))) <= 1 / np.sqrt(3072)
  np.testing.assert_allclose(np.std(kernel), 1 / np.sqrt(3 * 3072), rtol=0.03)


def test_conv_transpose_is_torch_conv_transpose_k4_s2_p1():
  """flax's ConvTranspose with our padding == torch's, up to a kernel flip."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 3, 1)).astype(np.float32)
  w = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
  import flax.linen as nn
  layer = nn.ConvTranspose(1, (4, 4), strides=(2, 2), padding=conv_ae._CONV_TRANSPOSE_PADDING,
                           use_bias=False)
  got = np.asarray(layer.apply({'params': {'kernel': w}}, x))[0, :, :, 0]
  # torch: out[s*i - p + a, s*j - p + b] += x[i, j] * w_torch[a, b], cropped to 2 * side.
  w_torch = w[::-1, ::-1, 0, 0]
  want = np.zeros((6, 6), np.float32)
  for i in range(3):
    for j in range(3):
      for a in range(4):
        for b in range(4):
          r, c = 2 * i - 1 + a, 2 * j - 1 + b
          if 0 <= r < 6 and 0 <= c < 6:
            want[r, c] += x[0, i, j, 0] * w_torch[a, b]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_patchify_roundtrip_and_layout():
  x = _images(2)
  patches = mae.patchify(x, 4)
  assert patches.shape == (2, 64, 48)
  np.testing.assert_array_equal(patches[:, 0], x[:, :4, :4].reshape(2, -1))
  np.testing.assert_array_equal(patches[:, 1], x[:, :4, 4:8].reshape(2, -1))
  np.testing.assert_array_equal(patches[:, 8], x[:, 4:8, :4].reshape(2, -1))
  np.testing.assert_array_equal(mae.unpatchify(patches, 4, 32, 32), x)
  np.testing.assert_array_equal(mae.unpatchify(mae.patchify(x, 2), 2, 32, 32), x)
  with pytest.raises(ValueError):
    mae.unpatchify(patches, 2, 32, 32)


def test_random_masking_keeps_64_of_256_with_fresh_masks():
  ids_keep, mask, ids_restore = mae.random_masking(jax.random.key(0), 8, 256, 0.75)
  assert ids_keep.shape == (8, 64)
  assert mask.shape == (8, 256)
  np.testing.assert_array_equal(mask.sum(axis=1), np.full(8, 192.0))
  # Visible patches are exactly the kept ids.
  for b in range(8):
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), np.sort(ids_keep[b]))
  # ids_restore inverts the shuffle.
  np.testing.assert_array_equal(
      jnp.take_along_axis(jnp.argsort(ids_restore, axis=1), ids_restore, axis=1),
      np.broadcast_to(np.arange(256), (8, 256)))
  # A different mask per image, and per key.
  assert len({tuple(np.asarray(m)) for m in mask}) == 8
  _, other, _ = mae.random_masking(jax.random.key(1), 8, 256, 0.75)
  assert not np.array_equal(mask, other)


def test_mae_forward_masks_per_image_and_encoder_sees_visible_only(tiny):
  cfg, variables = tiny['mae']  # 4x4 patches: 64, of which 16 stay visible
  ae = models.build_autoencoder(cfg)

  @jax.jit
  def run(variables, x, key):
    recon, aux = ae.apply(variables, x, train=True, rngs={'masking': key})
    visible = lambda m, x: m.encoder.encode_visible(x, mask_ratio=0.75, train=False)
    tokens, _, _ = ae.apply(variables, x, method=visible, rngs={'masking': key})
    return recon, aux, tokens

  x = _images(3)
  recon, aux, tokens = run(variables, x, jax.random.key(5))
  assert recon.shape == (3, 32, 32, 3) and recon.dtype == jnp.float32
  assert aux['pred_patches'].shape == (3, 64, 48)
  assert aux['mask'].shape == (3, 64)
  np.testing.assert_array_equal(aux['mask'].sum(axis=1), [48.0] * 3)
  assert not np.array_equal(aux['mask'][0], aux['mask'][1])
  np.testing.assert_allclose(mae.unpatchify(aux['pred_patches'], 4, 32, 32), recon)
  _, aux_other_key, _ = run(variables, x, jax.random.key(6))
  assert not np.array_equal(aux['mask'], aux_other_key['mask'])
  # The encoder sees the cls token and the 16 visible patches only...
  assert tokens.shape == (3, 1 + 16, 16)
  # ...so noise inside the removed patches (same key: same mask) changes nothing.
  noise = mae.unpatchify(mae.patchify(_images(3, seed=9), 4) * aux['mask'][..., None], 4, 32, 32)
  assert float(jnp.max(jnp.abs(noise))) > 0.5
  _, aux2, tokens2 = run(variables, x + noise, jax.random.key(5))
  np.testing.assert_array_equal(aux['mask'], aux2['mask'])
  np.testing.assert_allclose(tokens, tokens2, rtol=1e-6, atol=1e-6)
  # Noise in a visible patch does change them.
  visible_noise = noise.at[:].set(0.0) + 0.5 * (1.0 - mae.unpatchify(
      jnp.broadcast_to(aux['mask'][..., None], (3, 64, 48)), 4, 32, 32))
  _, _, tokens3 = run(variables, x + visible_noise, jax.random.key(5))
  assert not np.allclose(tokens, tokens3, atol=1e-4)


def test_mae_features_are_deterministic_and_match_encode(tiny):
  cfg, variables = tiny['mae']
  ae = models.build_autoencoder(cfg)
  ae0 = models.build_autoencoder(_tiny_mae(mask_ratio=0.0))
  ae_norm_pix = models.build_autoencoder(_tiny_mae(norm_pix_loss=True))
  enc = models.build_encoder(cfg)

  @jax.jit
  def run(variables, x, key):
    # No 'masking' rng needed: nothing is masked when extracting features.
    f1 = ae.apply(variables, x, method='encode')
    f2 = ae.apply(variables, x, method='encode', rngs={'masking': key})
    f3 = enc.apply({'params': variables['params']['encoder']}, x, train=False)
    # mask_ratio=0: the autoencoder masks nothing and needs no rng.
    r1, aux1 = ae0.apply(variables, x, train=True)
    r2, _ = ae0.apply(variables, x, train=True, rngs={'masking': key})
    norm_pix = ae_norm_pix.apply(variables, x, train=True, rngs={'masking': key})
    return f1, f2, f3, r1, aux1, r2, norm_pix

  x = _images(2)
  f1, f2, f3, r1, aux1, r2, (recon, aux) = run(variables, x, jax.random.key(3))
  assert f1.shape == (2, 16)
  np.testing.assert_array_equal(f1, f2)
  np.testing.assert_array_equal(f1, f3)
  np.testing.assert_array_equal(aux1['mask'], np.zeros((2, 64)))
  np.testing.assert_array_equal(r1, r2)
  # norm_pix_loss: the prediction is in normalized-patch units and the
  # reconstruction maps it back with the input patches' mean and std.
  mean, std = mae.patch_mean_std(mae.patchify(x, 4))
  np.testing.assert_allclose(mae.patchify(recon, 4), aux['pred_patches'] * std + mean,
                             rtol=1e-5, atol=1e-5)


def test_chunked_attention_equals_whole_batch_attention():
  """Attention over chunks of examples (the CPU path) gives the same values and gradients."""
  q, k, v = jax.random.normal(jax.random.key(0), (3, 6, 2, 5, 4))
  cotangent = jax.random.normal(jax.random.key(1), q.shape)

  def loss(chunk, q, k, v):  # the bytes of ``chunk[0]`` examples' float32 weights [c, H, T, T]
    chunk_bytes = 4 * chunk[0] * q.shape[1] * q.shape[2] ** 2
    return jnp.sum(vit.attention(q, k, v, chunk_bytes=chunk_bytes, groups=chunk[1]) * cotangent)

  whole, whole_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))((6, 1), q, k, v)
  # (examples per chunk, groups): one group, or the batch in 2 or 3 parts as over devices.
  for chunk in ((1, 1), (2, 1), (3, 1), (1, 2), (3, 2), (1, 3)):
    value, grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(chunk, q, k, v)
    np.testing.assert_allclose(value, whole, rtol=1e-5)
    for a, b in zip(grads, whole_grads):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_chunk_fits_the_budget_and_divides_the_batch():
  # The reference MAE decoder: 3 heads, 257 tokens, 792 KB of weights per image.
  budget = 2 << 20
  assert vit.attention_chunk(128, 3, 257, chunk_bytes=budget) == 2
  assert vit.attention_chunk(6, 3, 65, chunk_bytes=budget) == 6        # small batches run whole
  assert vit.attention_chunk(100, 3, 65, chunk_bytes=budget) == 25     # 41 would fit; 25 divides
  assert vit.attention_chunk(7, 64, 257, chunk_bytes=budget) == 1
  assert vit.attention_chunk(128, 3, 257, 2, budget) == 2              # within each device's 64
  assert vit.attention_chunk(100, 3, 65, 2, budget) == 25              # 41 would fit; 25 divides 50
  assert vit.attention_chunk(128, 3, 257) == 128                       # 0 bytes: no chunks
  assert vit.attention_chunk(128, 3, 257, groups=2) == 64


def test_sincos_position_embedding_is_not_a_param():
  table = vit.posemb_sincos_2d(8, 8, 16)
  assert table.shape == (64, 16)
  assert len({tuple(row) for row in np.round(table, 5)}) == 64  # every position distinct
  _, _, learned, _ = _shapes(_tiny_mae(pos_embedding='learned'))
  _, _, fixed, _ = _shapes(_tiny_mae(pos_embedding='sincos'))
  assert 'pos_embedding' in learned['params']['encoder']
  assert 'pos_embedding' not in fixed['params']['encoder']
  assert 'pos_embedding' not in fixed['params']['decoder']


@pytest.mark.parametrize('name', ['fc', 'conv', 'mae'])
def test_bfloat16_forward_keeps_float32_params(tiny, name):
  model_config, variables = tiny[name]
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.dtype = 'bfloat16'
  ae = models.build_autoencoder(model_config)
  x = _images(2)
  shapes = jax.eval_shape(lambda x: ae.init(RNGS, x, train=False), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

  @jax.jit
  def run(variables, x, key):
    recon, _ = ae.apply(variables, x, train=True, rngs={'masking': key})
    return recon, ae.apply(variables, x, method='encode')

  recon, features = run(variables, x, jax.random.key(2))
  assert recon.shape == (2, 32, 32, 3)
  assert bool(jnp.all(jnp.isfinite(recon)))
  assert features.dtype == jnp.bfloat16


@pytest.mark.parametrize('overrides, words', [
    ({'name': 'resnet'}, ['resnet', 'conv', 'fc', 'mae']),
    ({'patch_size': 5}, ['patch_size']),
    ({'mask_ratio': 1.0}, ['mask_ratio']),
    ({'num_heads': 3}, ['num_heads']),
    ({'dtype': 'float16'}, ['dtype']),
    ({'pool': 'max'}, ['pool']),
    ({'attention': 'flash'}, ['attention', 'auto', 'xla', 'cudnn']),
])
def test_bad_model_config_is_a_user_error(overrides, words):
  cfg = _tiny_mae()
  cfg.update(overrides)
  for build in (models.build_autoencoder, models.build_encoder):
    with pytest.raises(UserError) as e:
      build(cfg)
    for word in words:
      assert word in str(e.value)


def test_attention_variant_of_the_mae_config():
  assert mae_config.get_config('seed').model.attention == 'auto'
  assert mae_config.get_config('seed,attention=xla').model.attention == 'xla'


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention runs on NVIDIA GPUs')
@pytest.mark.parametrize('length', [7, 8, 65])
def test_fused_gpu_attention_matches_written_out_attention(length):
  """cuDNN attention, padded to an even length when odd, equals ``vit.attention``.

  At 7 tokens an unmasked padding key would move the output by about 1/8.
  """
  q, k, v = jax.random.normal(jax.random.key(0), (3, 4, length, 3, 64), jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

  def heads_first(fn):
    def out(q, k, v):  # [B, T, H, D] in and out
      y = fn(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)))
      return y.transpose(0, 2, 1, 3)
    return out

  def close(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)

  fused, fused_vjp = jax.vjp(vit._cudnn_attention, q, k, v)
  plain, plain_vjp = jax.vjp(heads_first(vit.attention), q, k, v)
  assert fused.shape == plain.shape == q.shape
  assert close(fused, plain)
  cotangent = cotangent.astype(q.dtype)
  for a, b in zip(fused_vjp(cotangent), plain_vjp(cotangent)):
    assert close(a, b)


def test_unknown_model_field_is_a_user_error():
  cfg = fc_config.get_config().model
  cfg.unlock()
  cfg.widths = (8,)
  with pytest.raises(UserError, match='widths'):
    models.build_autoencoder(cfg)


def _summary(config_arg: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}',
         'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'mil_jax.models', '--config', config_arg],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_summary_command_prints_json_last():
  run = _summary('configs/mae.py:seed,runlocal')
  assert run.returncode == 0, run.stderr
  lines = run.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  _, _, ae_vars, _ = _shapes(_tiny_mae())
  assert summary == {
      'model': 'mae',
      'params': _count(ae_vars['params']),
      'encoder_params': _count(ae_vars['params']['encoder']),
      'feature_dim': 16,
  }
  assert any(line.startswith('encoder') for line in lines)
  assert any(line.strip().startswith('transformer') for line in lines)

  bad = _summary('configs/mae.py:nonsense')
  assert bad.returncode == 2
  assert 'nonsense' in bad.stderr
