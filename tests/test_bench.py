"""Tests of the benchmark command and of steps per dispatch (no timing asserted)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mil_jax import bench
from mil_jax.models import conv_ae

from .conftest import run_command

FIELDS = ('model', 'stage', 'batch', 'dtype', 'steps_per_dispatch', 'images_per_s', 'step_ms',
          'compile_s', 'params', 'flops_per_image', 'flops_per_s', 'peak_memory_bytes',
          'backend', 'device_kind')


def check_record(record, model, stage, batch, k):
  assert set(FIELDS) <= set(record), set(FIELDS) - set(record)
  assert (record['model'], record['stage'], record['batch']) == (model, stage, batch)
  assert record['steps_per_dispatch'] == k
  assert record['images_per_s'] > 0 and record['step_ms'] > 0 and record['compile_s'] > 0
  assert record['params'] > 0 and record['flops_per_image'] > 0 and record['flops_per_s'] > 0
  assert record['backend'] == 'cpu' and record['device_kind']
  json.dumps(record)  # Every value is plain JSON.


def test_command_prints_one_json_line():
  result = run_command(['-m', 'mil_jax.bench', '--model', 'fc:runlocal', '--batch', '8',
                        '--steps_per_dispatch', '2', '--seconds', '0.02', '--windows', '1'],
                       timeout=120)
  assert result.returncode == 0, result.stderr
  lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
  assert len(lines) == 1
  check_record(json.loads(lines[0]), 'fc:runlocal', 'pretrain', 8, 2)


def test_command_rejects_unknown_model():
  result = run_command(['-m', 'mil_jax.bench', '--model', 'resnet'], timeout=60)
  assert result.returncode == 2
  assert 'unknown model' in result.stderr


@pytest.mark.parametrize('model,stage', [
    ('mae:seed,runlocal', 'pretrain'), ('conv:192,runlocal', 'probe'),
    ('fc:runlocal', 'finetune')])
def test_bench_one_every_model_and_stage(model, stage):
  record = bench.bench_one(model, 8, stage=stage, steps_per_dispatch=1, seconds=0.02, windows=1)
  check_record(record, model, stage, 8, 1)


@pytest.mark.parametrize('model', ['conv:192,runlocal', 'mae:seed,runlocal'])
def test_steps_per_dispatch_equals_single_steps(model):
  config = bench.load_config(model, 8, 'float32', 4)
  loop, state_a, _ = bench.build(config, 'pretrain')
  _, state_b, _ = bench.build(config, 'pretrain')
  data, perm = loop.train_data, loop.permutation(state_a.step)
  state_a, metrics_a = loop.train_chunk(state_a, data, perm, 4)
  losses_b = []
  for _ in range(4):
    state_b, metrics_b = loop.train_chunk(state_b, data, perm, 1)
    losses_b.append(metrics_b['train/loss'][0])
  assert int(state_a.step) == int(state_b.step) == 4
  np.testing.assert_allclose(metrics_a['train/loss'], np.stack(losses_b), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('side,cin,cout', [(32, 3, 6), (4, 12, 24), (2, 48, 24)])
def test_dot_convs_equal_flax_convs(side, cin, cout):
  """The dot-form convs compute nn.Conv / nn.ConvTranspose and their gradients exactly."""
  import flax.linen as nn
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (2, side, side, cin))
  params = {'kernel': jax.random.normal(keys[1], (4, 4, cin, cout)),
            'bias': jax.random.normal(keys[2], (cout,))}
  flax_convs = {
      conv_ae.conv_down: nn.Conv(cout, (4, 4), strides=(2, 2), padding=conv_ae._CONV_PADDING),
      conv_ae.conv_up: nn.ConvTranspose(cout, (4, 4), strides=(2, 2),
                                        padding=conv_ae._CONV_TRANSPOSE_PADDING)}
  for ours, theirs in flax_convs.items():
    def loss(fn, x, params):
      y = fn(x, params)
      return jnp.sum(y * jax.random.normal(keys[3], y.shape))  # A cotangent that is not 1.

    def ours_fn(x, p, ours=ours):
      return ours(x, **p)

    def theirs_fn(x, p, theirs=theirs):
      return theirs.apply({'params': p}, x)

    np.testing.assert_allclose(ours_fn(x, params), theirs_fn(x, params), rtol=1e-5, atol=1e-4)
    got = jax.grad(loss, argnums=(1, 2))(ours_fn, x, params)
    want = jax.grad(loss, argnums=(1, 2))(theirs_fn, x, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_conv_programs_compile_without_ynnpack_on_cpu(monkeypatch):
  """platform.CPU_COMPILER_OPTIONS reaches the trainer's compiled program."""
  from mil_jax import platform

  def compiled_text():
    config = bench.load_config('conv:192,runlocal', 8, 'float32', 1)
    loop, state, _ = bench.build(config, 'pretrain')
    return loop.train_chunk.lower(state, loop.train_data, loop.permutation(state.step),
                                  1).compile().as_text()

  assert platform.compiler_options('conv') == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert '__ynn' not in compiled_text()
  monkeypatch.setattr(platform, 'CPU_COMPILER_OPTIONS', {})
  assert '__ynn' in compiled_text()
