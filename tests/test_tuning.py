"""Tests of mil_jax.tuning: the speed settings, decided in one place for the platform."""
import functools
import json
import pathlib
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import classifier as classifier_config
from configs import conv as conv_config
from configs import fc as fc_config
from configs import mae as mae_config
from mil_jax import classify, input_pipeline, models, pretrain, sharding, tuning
from mil_jax.errors import UserError

from .conftest import run_command, run_in

CPU = tuning.Platform(backend='cpu', devices=8, split_cpu=True, cpu_kind='avx2',
                      gpu_compute_capability=0.0)
GPU = tuning.Platform(backend='gpu', devices=4, split_cpu=False, cpu_kind='',
                      gpu_compute_capability=9.0)


def resolve(speed=None, *, where=CPU, batch=32, k=8, architecture='conv'):
  return tuning.resolve(speed, batch_size=batch, steps_per_dispatch=k,
                        architecture=architecture, where=where)


def test_auto_on_a_cpu_and_on_a_gpu():
  cpu, gpu = resolve(), resolve(where=GPU)
  assert (cpu.devices, cpu.conv_impl, cpu.attention_chunk_bytes, cpu.grad_norm_every,
          cpu.max_in_flight) == (8, 'dots', 2 << 20, 8, 2)
  assert (gpu.devices, gpu.conv_impl, gpu.attention_chunk_bytes, gpu.grad_norm_every,
          gpu.max_in_flight) == (4, 'dots', 0, 1, 0)
  assert cpu.compiler_options() == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert gpu.compiler_options() is None  # an XLA:CPU option never reaches a GPU program


def test_devices_on_a_split_cpu_divide_the_batch_and_follow_cpu_devices():
  assert resolve(batch=12).devices == 6                    # 8 do not divide 12
  assert resolve(batch=7).devices == 7
  assert resolve({'cpu_devices': 1}).devices == 1          # FC's config
  assert resolve({'cpu_devices': '3'}, batch=12).devices == 3  # the command line gives strings
  assert resolve({'devices': 2}).devices == 2
  user_split = tuning.Platform('cpu', 8, False, 'avx2', 0.0)  # XLA_FLAGS set by the user
  assert resolve({'cpu_devices': 1}, where=user_split).devices == 8


def test_fc_config_keeps_one_cpu_device_and_the_others_all():
  assert resolve(fc_config.get_config().speed.to_dict(), batch=128).devices == 1
  assert resolve(conv_config.get_config().speed.to_dict()).devices == 8
  assert resolve(fc_config.get_config().speed.to_dict(), where=GPU, batch=128).devices == 4


@pytest.mark.parametrize('speed, words', [
    ({'devices': 0}, ['speed.devices', '>= 1']),
    ({'devices': 'many'}, ['speed.devices', "'auto'"]),
    ({'devices': 16}, ['16', '8 devices']),
    ({'conv_impl': 'winograd'}, ['speed.conv_impl', 'dots', 'xla']),
    ({'attention_chunk_bytes': -1}, ['attention_chunk_bytes']),
    ({'grad_norm_every': 0}, ['grad_norm_every', '>= 1']),
    ({'max_in_flight': 1.5}, ['max_in_flight']),
    ({'cpu_ynn_fusions': 'some'}, ['cpu_ynn_fusions', 'all', 'no_reduce', 'none']),
    ({'cpu_devices': 0}, ['cpu_devices']),
])
def test_bad_settings_are_user_errors(speed, words):
  with pytest.raises(UserError) as e:
    resolve(speed)
  for word in words:
    assert word in str(e.value)


def test_several_processes_train_on_every_device():
  where = tuning.Platform('cpu', 4, False, 'avx2', 0.0, processes=2)
  assert resolve(where=where).devices == 4
  with pytest.raises(UserError, match='2 processes'):
    resolve({'devices': 2}, where=where)


def test_given_values_win_over_auto():
  speed = resolve({'conv_impl': 'xla', 'attention_chunk_bytes': '0', 'grad_norm_every': 1,
                   'max_in_flight': 5, 'cpu_ynn_fusions': 'all'})
  assert (speed.conv_impl, speed.attention_chunk_bytes, speed.grad_norm_every,
          speed.max_in_flight, speed.cpu_ynn_fusions) == ('xla', 0, 1, 5, 'all')
  assert speed.compiler_options() is None  # 'all': XLA's own default


def test_ynn_fusions_follow_the_cpu_kind_and_architecture():
  for kind, table in tuning.CPU_YNN_FUSIONS.items():
    where = tuning.Platform('cpu', 2, True, kind, 0.0)
    for architecture, fusions in table.items():
      assert resolve(where=where, architecture=architecture).cpu_ynn_fusions == fusions
  other = tuning.Platform('cpu', 2, True, 'other', 0.0)  # an unmeasured CPU: the AVX2 choices
  assert resolve(where=other, architecture='mae').cpu_ynn_fusions == \
      tuning.CPU_YNN_FUSIONS['avx2']['mae']
  assert resolve(architecture='head').cpu_ynn_fusions == tuning.DEFAULT_YNN_FUSIONS


def test_cpu_kind_from_the_flags_line():
  flags = 'processor : 0\nflags\t\t: fpu sse2 {}\nbugs : none\n'
  assert tuning.kind_of(flags.format('avx2 avx512f amx_tile')) == 'avx512'
  assert tuning.kind_of(flags.format('avx2 fma')) == 'avx2'
  assert tuning.kind_of(flags.format('neon')) == 'other'
  assert tuning.kind_of('') == 'other'


def test_attention_auto_picks_cudnn_only_where_it_runs():
  seed = mae_config.get_config('seed').model.to_dict()
  bf16 = {**seed, 'dtype': 'bfloat16'}
  assert resolve(where=GPU).model_settings(bf16)['attention'] == 'cudnn'
  assert resolve(where=GPU).model_settings(seed)['attention'] == 'xla'     # float32
  assert resolve().model_settings(bf16)['attention'] == 'xla'              # a CPU
  t4 = tuning.Platform('gpu', 1, False, '', 7.5)
  assert resolve(where=t4).model_settings(bf16)['attention'] == 'xla'
  wide = {**bf16, 'width': 768, 'num_heads': 3}                            # head width 256
  assert resolve(where=GPU).model_settings(wide)['attention'] == 'xla'
  assert resolve(where=GPU).model_settings({**bf16, 'attention': 'xla'})['attention'] == 'xla'
  with pytest.raises(UserError, match='NVIDIA GPU'):
    resolve().model_settings({**bf16, 'attention': 'cudnn'})
  assert resolve().model_settings(conv_config.get_config().model.to_dict())['conv_impl'] == 'dots'


def test_no_model_asks_for_the_backend_or_the_device_count():
  """How a model computes comes from its settings, never from where it is traced."""
  sources = pathlib.Path(models.__file__).parent.glob('*.py')
  asked = [f'{p.name}: {m.group(0)}' for p in sources for m in re.finditer(
      r'jax\.(default_backend|device_count|devices|local_devices|process_count)\(|'
      r'mil_jax import (sharding|platform|tuning)', p.read_text())]
  assert not asked, asked


@pytest.mark.parametrize('model', ['conv', 'masked_unet'])
def test_conv_impls_compute_the_same_function(model):
  cfg = (conv_config.get_config('192') if model == 'conv' else
         __import__('configs.masked_unet', fromlist=['x']).get_config()).model.to_dict()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  dots = models.build_autoencoder(cfg, {'conv_impl': 'dots'})
  xla = models.build_autoencoder(cfg, {'conv_impl': 'xla'})
  rngs = {'params': jax.random.key(1), 'masking': jax.random.key(2)}
  # Jitted: one compiled program each, not hundreds of single operations.
  variables = jax.jit(lambda: dots.init(rngs, x, train=False))()
  assert (jax.tree.structure(variables)
          == jax.tree.structure(jax.eval_shape(lambda: xla.init(rngs, x, train=False))))

  def loss(module, params):
    out, _ = module.apply({'params': params}, x, train=True, rngs={'masking': rngs['masking']})
    return jnp.sum(out ** 2)

  (loss_dots, grads_dots), (loss_xla, grads_xla) = (
      jax.jit(jax.value_and_grad(functools.partial(loss, m)))(variables['params'])
      for m in (dots, xla))
  np.testing.assert_allclose(loss_dots, loss_xla, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_dots), jax.tree.leaves(grads_xla)):
    # Equal up to float32 summation order, which eight layers and their
    # LayerNorms amplify to about 1e-3 of a leaf; a wrong padding or flip is O(1).
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), (a, b)


def test_grad_norm_every_measures_counted_back_from_each_chunks_last_step():
  config = fc_config.get_config('l2,runlocal')
  config.model.hidden_dims = (16, 8)
  config.data.fake_train_size, config.batch_size = 64, 8
  config.speed.grad_norm_every = '3'  # as the command line gives it
  mesh = sharding.training_mesh(1)
  data = input_pipeline.DeviceSplit.create(
      input_pipeline.load_split(config.data, config.data.train_split), mesh)
  loop, params = pretrain.build_trainer(config, models.build_autoencoder(config.model), data,
                                        data, mesh)
  assert loop.speed.grad_norm_every == 3
  state = loop.init_state(params)
  _, metrics = loop.train_chunk(state, data, loop.permutation(state.step), 7)
  measured = np.isfinite(np.asarray(metrics['train/grad_norm']))
  np.testing.assert_array_equal(measured, [i % 3 == 0 for i in range(6, -1, -1)])


def test_classifier_cpu_devices_follow_the_encoder_one_for_cached_features():
  config = classifier_config.get_config()
  assert config.speed.cpu_devices == 'auto'
  encoder = classify.Encoder({'name': 'fc'}, None, '', 1)
  config.freeze, config.cache_features = False, False
  assert classify.resolve_speed(config, encoder).cpu_devices == 1
  encoder = classify.Encoder({'name': 'conv'}, None, '', 'all')
  assert classify.resolve_speed(config, encoder).cpu_devices == 'all'
  config.freeze, config.cache_features = True, True
  speed = classify.resolve_speed(config, encoder)
  assert speed.cpu_devices == 1 and speed.devices == 1


def test_the_run_records_its_settings_and_resumes_under_other_ones(repo_copy):
  repo = repo_copy
  command = ['train_pretrain.py', '--config', 'configs/conv.py:192,runlocal',
             '--config.num_epochs=1', '--config.speed.conv_impl=xla']
  out = run_in(repo, command)
  assert out.returncode == 0, out.stderr[-3000:]
  recorded = json.loads((repo / 'runs' / 'pretrain_conv' / 'config.json').read_text())['speed']
  expected = resolve({'conv_impl': 'xla'}, where=tuning.Platform.current(), batch=32, k=16)
  assert recorded['conv_impl'] == 'xla' and recorded['backend'] == 'cpu'
  assert recorded['cpu_kind'] == tuning.cpu_kind()
  assert recorded['grad_norm_every'] == expected.grad_norm_every
  # Another way of computing the same run is no reason to refuse it.
  out = run_in(repo, [*command[:3], '--config.num_epochs=2', '--config.speed.conv_impl=dots'])
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming from step' in out.stdout
  recorded = json.loads((repo / 'runs' / 'pretrain_conv' / 'config.json').read_text())['speed']
  assert recorded['conv_impl'] == 'dots'


def test_no_reduce_is_xlas_default_without_reductions():
  """'no_reduce' compiles what XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce
  compiled (the process-wide flag these settings replace)."""
  script = textwrap.dedent('''
      import hashlib, re, sys, jax, jax.numpy as jnp
      from mil_jax import tuning
      def f(x, w, k):
        y = jnp.tanh(x @ w)
        c = jax.lax.conv_general_dilated(y.reshape(4, 16, 16, 64), k, (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jnp.sum(jax.nn.softmax(c, axis=-1) ** 2, axis=(1, 2))
      args = (jnp.ones((1024, 64)), jnp.ones((64, 64)), jnp.ones((3, 3, 64, 64)))
      value = tuning.YNN_FUSIONS[sys.argv[1]]
      options = None if value is None else {'xla_cpu_experimental_ynn_fusion_type': value}
      text = jax.jit(f, compiler_options=options).lower(*args).compile().as_text()
      text = re.sub(r'HloModule \\S+|, metadata=\\{[^}]*\\}', '', text)
      print(hashlib.md5(text.encode()).hexdigest(), text.count('ynn_fusion'))
  ''')
  def compiled(setting, xla_flags=''):
    out = run_command(['-c', script, setting], env={'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu'})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()
  flag = '--xla_cpu_experimental_ynn_fusion_type=-reduce'
  assert compiled('no_reduce') == compiled('all', flag)
  assert compiled('all') != compiled('no_reduce')     # reductions do reach YNNPACK by default
  assert compiled('none')[1] == '0'
