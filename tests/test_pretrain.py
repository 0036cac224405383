"""End-to-end tests of the pretraining stage on tiny models and fake data."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import conv as conv_config
from configs import fc as fc_config
from configs import mae as mae_config
from mil_jax import checkpoint, models, pretrain, sharding, trainer
from mil_jax.metric_writers import read_metrics

from .conftest import assert_picture, latest_params, run_command


def tiny(module, variant, optimizer='adam', **loop):
  config = module.get_config(variant)
  config.data.fake_train_size = 128
  config.data.fake_test_size = 40   # not a multiple of the batch: the eval pads
  config.batch_size = 32
  config.log_every_steps = 2
  config.optim.lr = 1e-3
  config.optim.warmup_epochs = 0
  if optimizer == 'sgd':
    config.optim.name, config.optim.lr = 'sgd', 0.05
  config.update(loop)
  return config


@pytest.mark.parametrize('module,variant,epochs', [
    (fc_config, 'l1,runlocal', 3), (conv_config, '192,runlocal', 3),
    (mae_config, 'seed,runlocal', 3)])
def test_pretrain_end_to_end(tmp_path, module, variant, epochs):
  config = tiny(module, variant, num_epochs=epochs)
  final = pretrain.train_and_evaluate(config, tmp_path)
  records = read_metrics(tmp_path)
  epoch_ends = [r for r in records if 'eval/loss' in r]
  assert [r['epoch'] for r in epoch_ends] == [1.0, 2.0, 3.0]
  train_losses = [r['train/loss'] for r in epoch_ends]
  assert train_losses[-1] < train_losses[0]
  assert epoch_ends[-1]['eval/loss'] < epoch_ends[0]['eval/loss']
  assert final['eval/loss'] == pytest.approx(epoch_ends[-1]['eval/loss'], rel=1e-5)
  assert all(k in final for k in ('eval/mse', 'eval/psnr'))
  step_records = [r for r in records if 'train/lr' in r]
  assert step_records and all(r['train/grad_norm'] > 0 for r in step_records)
  assert_picture(tmp_path / 'loss.png', curves=2)  # train and eval loss
  assert_picture(tmp_path / 'reconstructions.png', min_side=100)
  [events] = tmp_path.glob('events.out.tfevents.*')
  for tag in (b'train/loss', b'eval/loss', b'eval/psnr'):
    assert tag in events.read_bytes(), tag
  assert json.loads((tmp_path / 'config.json').read_text())['model']['name'] == config.model.name
  step, params = latest_params(tmp_path)
  assert step == 4 * epochs and set(params) == {'encoder', 'decoder'}
  meta = checkpoint.read_meta(tmp_path / 'checkpoints', step)
  assert json.loads(checkpoint.config_from_meta(meta).to_json()) == json.loads(config.to_json())
  assert meta['step'] == step and meta['stage'] == 'pretrain'


def _signal_after(monkeypatch, chunks):
  """Makes every Trainer send itself SIGTERM right after its ``chunks``-th dispatch."""
  original_init = trainer.Trainer.__post_init__

  def init(self):
    original_init(self)
    jitted, calls = self.train_chunk, []

    def chunk(*args):
      out = jitted(*args)
      calls.append(1)
      if len(calls) == chunks:
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    self.train_chunk = chunk

  monkeypatch.setattr(trainer.Trainer, '__post_init__', init)


def test_interrupted_run_resumes_bit_identical(tmp_path, monkeypatch):
  config = tiny(conv_config, '192,runlocal', num_epochs=2, steps_per_dispatch=2,
                checkpoint_every_steps=100)
  pretrain.train_and_evaluate(config, tmp_path / 'whole')
  _, whole = latest_params(tmp_path / 'whole')

  _signal_after(monkeypatch, 3)  # 6 steps: mid-epoch 2, no other checkpoint there
  with pytest.raises(trainer.Interrupted, match='step 6'):
    pretrain.train_and_evaluate(config, tmp_path / 'cut')
  monkeypatch.undo()
  assert latest_params(tmp_path / 'cut')[0] == 6
  pretrain.train_and_evaluate(config, tmp_path / 'cut')
  step, resumed = latest_params(tmp_path / 'cut')
  assert step == 8
  jax.tree.map(np.testing.assert_array_equal, whole, resumed)
  # The resumed run logged the steps after 6 only once.
  steps = [r['step'] for r in read_metrics(tmp_path / 'cut') if 'train/lr' in r]
  assert steps == sorted(set(steps))


def test_eight_devices_match_one(tmp_path):
  script = """
import pathlib, sys
import jax, numpy as np
from configs import conv as conv_config
from mil_jax import pretrain
from tests.test_pretrain import tiny
workdir = pathlib.Path(sys.argv[1])
config = tiny(conv_config, '192,runlocal', 'sgd', num_epochs=1)
config.data.fake_train_size = 32  # one step: float noise has no steps to grow over
pretrain.train_and_evaluate(config, workdir)
print(len(jax.devices()))
"""
  out = run_command(['-c', script, str(tmp_path / '8')], env={
      'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == '8'

  config = tiny(conv_config, '192,runlocal', 'sgd', num_epochs=1)
  config.data.fake_train_size = 32
  pretrain.train_and_evaluate(config, tmp_path / '1')
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  one = flat(latest_params(tmp_path / '1')[1])
  # Saved sharded over 8 devices, restored here on 1 (checkpoint.restore_params).
  eight = flat(latest_params(tmp_path / '8')[1])
  init = flat(pretrain.init_params(config, models.build_autoencoder(config.model),
                                   sharding.make_mesh()))
  assert one.keys() == eight.keys() == init.keys()
  # The one step's update of each tensor, against how far the two runs disagree.
  # Summation order differs across devices (seen: up to 7e-4 of the update);
  # a sharding bug (unaveraged gradients, wrong rows per device) is ~100%. Over
  # several steps ReLU kinks and momentum would blow the float noise up.
  for name in one:
    moved = np.linalg.norm(one[name] - init[name])
    assert moved > 0, name
    assert np.linalg.norm(eight[name] - one[name]) < 0.01 * moved, name


def test_command_line_variants_overrides_and_type(tmp_path):
  out = run_command(['train_pretrain.py', '--config', 'configs/fc.py:l1,runlocal',
                     '--config.num_epochs=1', '--config.optim.lr=0.002',
                     f'--workdir={tmp_path / "fc"}'])
  assert out.returncode == 0, out.stderr[-3000:]
  stored = json.loads((tmp_path / 'fc' / 'config.json').read_text())
  assert (stored['loss'], stored['num_epochs'], stored['optim']['lr']) == ('l1', 1, 0.002)
  assert 'epoch 1/1' in out.stdout

  out = run_command(['train_pretrain.py', '--type', 'conv', '--config.data.source=fake',
                     '--config.num_epochs=1', '--config.data.fake_train_size=64',
                     '--config.data.fake_test_size=16', f'--workdir={tmp_path / "conv"}'])
  assert out.returncode == 0, out.stderr[-3000:]
  stored = json.loads((tmp_path / 'conv' / 'config.json').read_text())
  assert stored['model']['name'] == 'conv' and stored['batch_size'] == 32


def test_command_line_mistakes_exit_2(tmp_path):
  for args, message in [
      (['--config', 'configs/fc.py:l3'], "unknown variant 'l3'"),
      (['--config', 'configs/fc.py', '--config.optim.lrr=1'], 'no field'),
      (['--config', 'configs/fc.py', '--config.batch_size=abc'], 'batch_size'),
      (['--config', 'configs/nope.py'], 'does not exist'),
      (['--type', 'vit'], "unknown --type 'vit'"),
  ]:
    out = run_command(['train_pretrain.py', *args, f'--workdir={tmp_path}'])
    assert out.returncode == 2, (args, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (args, out.stderr)
