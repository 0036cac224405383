"""Tests of the benchmark command and of steps per dispatch (no timing asserted)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mil_jax import bench, run_bench
from mil_jax.models import conv_ae

from .conftest import run_command

FIELDS = ('model', 'stage', 'batch', 'dtype', 'steps_per_dispatch', 'images_per_s', 'step_ms',
          'compile_s', 'params', 'flops_per_image', 'flops_per_s', 'mfu', 'peak_memory_bytes',
          'backend', 'device_kind')


def check_record(record, model, stage, batch, k):
  assert set(FIELDS) <= set(record), set(FIELDS) - set(record)
  assert (record['model'], record['stage'], record['batch']) == (model, stage, batch)
  assert record['steps_per_dispatch'] == k
  assert record['images_per_s'] > 0 and record['step_ms'] > 0 and record['compile_s'] > 0
  assert record['params'] > 0 and record['flops_per_image'] > 0 and record['flops_per_s'] > 0
  assert record['backend'] == 'cpu' and record['device_kind']
  assert record['mfu'] is None  # no datasheet peak for a CPU
  json.dumps(record)  # Every value is plain JSON.


def test_command_prints_one_json_line_per_configuration():
  result = run_command(['-m', 'mil_jax.bench', '--model', 'fc:runlocal', '--batch', '8,16',
                        '--steps_per_dispatch', '2', '--seconds', '0.02', '--windows', '1'],
                       timeout=120)
  assert result.returncode == 0, result.stderr
  lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
  assert len(lines) == 2
  check_record(json.loads(lines[0]), 'fc:runlocal', 'pretrain', 8, 2)
  check_record(json.loads(lines[1]), 'fc:runlocal', 'pretrain', 16, 2)


def test_command_rejects_a_bad_batch_list():
  result = run_command(['-m', 'mil_jax.bench', '--model', 'fc:runlocal', '--batch', '8,x'],
                       timeout=60)
  assert result.returncode == 2
  assert '--batch' in result.stderr and 'Traceback' not in result.stderr


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


def test_epoch_timing_runs_whole_epochs():
  # 5 steps of 8 per epoch at K=2: two 2-step calls and a 1-step one.
  config = bench.load_config('fc:runlocal', 8, 'float32', 2, train_size=40)
  loop, state, _ = bench.build(config, 'pretrain')
  compiled = loop.train_chunk.lower(state, loop.train_data, loop.permutation(state.step),
                                    2).compile()
  times, state = bench._time_epochs(loop, compiled, state, windows=2)  # noqa: SLF001
  assert len(times) == 2 and all(t > 0 for t in times)
  assert int(state.step) == 3 * 5  # a warm-up epoch and two timed ones
  record = bench.bench_one('fc:runlocal', 8, steps_per_dispatch=2, seconds=0.02, windows=1,
                           epoch_images=40)
  assert record['epoch_images'] == 40 and record['epoch_s'] > 0


def _dot_flops(m, k, n):
  return 2 * m * k * n


def test_flop_count_of_dots_convs_scans_and_conds():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  count = lambda f, *a: bench._jaxpr_flops(jax.make_jaxpr(f)(*a).jaxpr)  # noqa: SLF001, E731
  assert count(jnp.dot, x, w) == _dot_flops(4, 8, 16)
  batched = jnp.ones((3, 4, 8))
  assert count(lambda a, b: jnp.einsum('btd,de->bte', a, b), batched, w) == 3 * _dot_flops(4, 8, 16)
  scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=5)[1]  # noqa: E731
  assert count(scanned, x, w) == 5 * _dot_flops(4, 8, 16)
  # A cond runs one branch: the costlier one counts.
  both = lambda p, a, b: jax.lax.cond(p, lambda: (a @ b) @ b.T, lambda: a)  # noqa: E731
  assert count(both, True, x, w) == _dot_flops(4, 8, 16) + _dot_flops(4, 16, 8)
  grad = jax.value_and_grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1))
  assert count(grad, x, w) == 3 * _dot_flops(4, 8, 16)  # the product, dA and dB
  images, kernel = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 5))  # HWIO
  conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), 'VALID',  # noqa: E731
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert count(conv, images, kernel) == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)


def test_peak_flops_table():
  assert bench._peak_flops('NVIDIA H100 80GB HBM3') == 989e12  # noqa: SLF001
  assert bench._peak_flops('NVIDIA H100 PCIe') == 756e12  # noqa: SLF001
  assert bench._peak_flops('cpu') is None  # noqa: SLF001


@pytest.mark.parametrize('model', ['conv:192,runlocal', 'mae:seed,runlocal'])
def test_steps_per_dispatch_equals_single_steps(model):
  config = bench.load_config(model, 8, 'float32', 4)
  loop, state_a, _ = bench.build(config, 'pretrain')
  _, state_b, _ = bench.build(config, 'pretrain')
  data, perm = loop.train_data, loop.permutation(state_a.step)
  state_a, metrics_a = loop.train_chunk(state_a, data, perm, 4)
  losses_b, norms_b = [], []
  for _ in range(4):
    state_b, metrics_b = loop.train_chunk(state_b, data, perm, 1)
    losses_b.append(metrics_b['train/loss'][0])
    norms_b.append(metrics_b['train/grad_norm'][0])
  assert int(state_a.step) == int(state_b.step) == 4
  # The scan and the single step are different programs, which XLA may fuse
  # differently: equal up to float32 rounding. A step on another batch changes
  # the losses by percents (the scan over the reversed permutation: 5-7%).
  np.testing.assert_allclose(metrics_a['train/loss'], np.stack(losses_b), rtol=1e-5)
  # A chunk measures the gradient norm on its last step only; single steps on each.
  assert np.isnan(metrics_a['train/grad_norm'][:3]).all()
  assert np.isfinite(norms_b).all() and norms_b[3] > 0
  np.testing.assert_allclose(metrics_a['train/grad_norm'][3], norms_b[3], rtol=1e-3)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize('fusions', ['none', 'all'])
def test_ynn_setting_reaches_the_compiled_program(fusions):
  """speed.cpu_ynn_fusions decides whether the train step uses YNNPACK's kernels."""
  config = bench.load_config('conv:192,runlocal', 8, 'float32', 1,
                             speed={'cpu_ynn_fusions': fusions})
  loop, state, _ = bench.build(config, 'pretrain')
  assert loop.speed.cpu_ynn_fusions == fusions
  text = loop.train_chunk.lower(state, loop.train_data, loop.permutation(state.step),
                                1).compile().as_text()
  assert ('__ynn' in text) == (fusions == 'all')


def test_run_summary_leaves_out_the_first_epoch():
  records = [{'time/epoch_s': 10.0, 'time/train_s': 9.0, 'time/eval_s': 0.5,
              'time/checkpoint_s': 0.25, 'time/other_s': 0.25},
             {'time/epoch_s': 5.0, 'time/train_s': 4.0, 'time/eval_s': 0.5,
              'time/checkpoint_s': 0.2, 'time/other_s': 0.3},
             {'time/epoch_s': 7.0, 'time/train_s': 6.0, 'time/eval_s': 0.7,
              'time/checkpoint_s': 0.1, 'time/other_s': 0.2},
             {'time/epoch_s': 6.0, 'time/train_s': 4.5, 'time/eval_s': 0.6,
              'time/checkpoint_s': 0.6, 'time/other_s': 0.3, 'time/startup_s': 3.0}]
  out = run_bench.summary([4.0, 6.0, 5.0], records)
  assert out['step_epoch_s'] == 5.0 and out['run_epoch_s'] == 6.0 and out['ratio'] == 1.2
  assert (out['run_train_s'], out['run_eval_s'], out['run_checkpoint_s'],
          out['run_other_s']) == (4.5, 0.6, 0.2, 0.3)
  assert out['startup_s'] == 3.0 and out['run_epoch_s_windows'] == [10.0, 5.0, 7.0, 6.0]


def test_run_command_sets_a_whole_run_beside_its_steps():
  result = run_command(['-m', 'mil_jax.bench', '--run', '--model', 'fc:runlocal', '--batch', '8',
                        '--steps_per_dispatch', '2', '--run_images', '40', '--run_epochs', '2',
                        '--windows', '1'], timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert (record['model'], record['stage'], record['batch']) == ('fc:runlocal', 'run', 8)
  assert record['epoch_images'] == 40 and record['epochs'] == 2
  assert len(record['step_epoch_s_windows']) == 2  # one epoch before the run, one after
  assert record['step_epoch_s'] == pytest.approx(np.median(record['step_epoch_s_windows']),
                                                 abs=1e-4)
  first, second = record['run_epoch_s_windows']
  assert record['run_epoch_s'] == second  # the first epoch, which compiles, left out
  assert record['ratio'] == pytest.approx(second / record['step_epoch_s'], abs=6e-4)
  parts = [record[f'run_{name}_s'] for name in ('train', 'eval', 'checkpoint', 'other')]
  assert sum(parts) == pytest.approx(second, abs=5e-4)
  assert record['startup_s'] > 0 and record['run_wall_s'] > first + second


@pytest.mark.parametrize('args,message', [
    (['--run_epochs', '1'], '--run_epochs of at least 2'),
    (['--run_images', '4'], '--run_images of at least one batch'),
    (['--stage', 'probe'], 'drop --stage'),
])
def test_run_command_mistakes(args, message):
  result = run_command(['-m', 'mil_jax.bench', '--run', '--model', 'fc:runlocal', '--batch', '8',
                        *args], timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_the_run_decides_its_own_xla_flags():
  # The benchmark's own CPU tuning must not reach the run as if the user had set it.
  script = """
import os
os.environ['XLA_FLAGS'] = '--xla_dump_to=/nonexistent'
from mil_jax import platform, run_bench
platform.configure()
print(os.environ['XLA_FLAGS'])
print(run_bench.environment()['XLA_FLAGS'])
"""
  out = run_command(['-c', script], env={'JAX_PLATFORMS': 'cpu'}, timeout=60)
  assert out.returncode == 0, out.stderr[-3000:]
  tuned, run = out.stdout.splitlines()
  if len(os.sched_getaffinity(0)) > 1:  # configure split the CPU into one device per core
    assert '--xla_force_host_platform_device_count' in tuned
  assert run == '--xla_dump_to=/nonexistent'
