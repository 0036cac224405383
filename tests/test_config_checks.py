"""Every config value is checked, with one sentence, before a run touches its workdir."""
from __future__ import annotations

import json

import pytest

from configs import classifier as classifier_config
from configs import conv as conv_config
from configs import fc as fc_config
from configs import reproduce as reproduce_config
from mil_jax import config_checks, workdir
from mil_jax.errors import UserError
from mil_jax.metric_writers import MetricWriter, read_metrics


def _set(config, path: str, value) -> None:
  *parents, name = path.split('.')
  for p in parents:
    config = config[p]
  config[name] = value


@pytest.mark.parametrize('path,value,message', [
    ('batch_size', 0, 'batch_size must be at least 1'),
    ('num_epochs', -1, 'num_epochs must be at least 1'),
    ('steps_per_dispatch', 0, 'steps_per_dispatch must be at least 1'),
    ('log_every_steps', 0, 'log_every_steps must be at least 1'),
    ('eval_every_epochs', 0, 'eval_every_epochs must be at least 1'),
    ('checkpoint_every_steps', -1, 'checkpoint_every_steps must be at least 0'),
    ('checkpoint_every_secs', float('nan'), 'checkpoint_every_secs must be a finite number'),
    ('keep_checkpoints', 0, 'keep_checkpoints must be at least 1'),
    ('optim.lr', -1e-3, 'optim.lr must be a finite number above 0'),
    ('optim.lr', float('nan'), 'optim.lr must be a finite number above 0'),
    ('optim.lr', float('inf'), 'optim.lr must be a finite number above 0'),
    ('optim.weight_decay', -0.1, 'optim.weight_decay must be a finite number of at least 0'),
    ('optim.b2', 1.0, 'optim.b2 must be in [0, 1)'),
    ('optim.decay_rate', 0.0, 'optim.decay_rate must be a finite number above 0'),
    ('optim.warmup_epochs', -2, 'optim.warmup_epochs must be at least 0'),
    ('optim.name', 'lamb', "unknown optim.name 'lamb'"),
    ('optim.schedule', 'step', "unknown optim.schedule 'step'"),
    ('loss', 'l3', "unknown loss 'l3'"),
    ('data.source', 'imagenet', "unknown data source 'imagenet'"),
    ('data.source', 'npz:', "unknown data source 'npz:'"),
    ('data.train_split', 'train[:150%]', 'percentage outside -100% to 100%'),
    ('data.eval_split', 'train[:5', 'is not understood'),
    ('data.fake_train_size', 0, 'data.fake_train_size must be at least 1'),
    ('data.fake_num_classes', 1, 'data.fake_num_classes must be at least 2'),
    ('model.hidden_dims', (64, 0), 'hidden_dims must be positive'),
])
def test_pretraining_values(path, value, message):
  config = fc_config.get_config('runlocal')
  config_checks.check_pretraining(config)  # the shipped values pass
  _set(config, path, value)
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace('(', r'\(')
                     .replace(')', r'\)')):
    config_checks.check_pretraining(config)


@pytest.mark.parametrize('path,value,message', [
    ('mode', 'svm', "unknown mode 'svm'"),
    ('knn.k', 0, 'knn.k must be at least 1'),
    ('knn.k', -5, 'knn.k must be at least 1'),
    ('knn.temperature', 0.0, 'knn.temperature must be a finite number above 0'),
    ('head.dropout_rate', 1.5, r'head.dropout_rate must be in \[0, 1\)'),
    ('head.dropout_rate', 1.0, r'head.dropout_rate must be in \[0, 1\)'),
    ('head.hidden_dim', -1, 'head.hidden_dim must be at least 0'),
    ('label_smoothing', 1.0, r'label_smoothing must be in \[0, 1\)'),
    ('frozen_lr', float('nan'), 'frozen_lr must be a finite number of at least 0'),
    ('optim.lr', 0.0, 'optim.lr must be a finite number above 0'),
])
def test_classifier_values(path, value, message):
  config = classifier_config.get_config('runlocal')
  config_checks.check_classifier(config)
  _set(config, path, value)
  with pytest.raises(UserError, match=message):
    config_checks.check_classifier(config)


def test_every_shipped_variant_passes():
  for variant in ('l1', 'l2', 'l1,runlocal'):
    config_checks.check_pretraining(fc_config.get_config(variant))
  for variant in ('192', '256', 'layers=5,factor=2,filters=8'):
    config_checks.check_pretraining(conv_config.get_config(variant))
  for variant in ('', 'seed', 'runlocal', 'seed,runlocal'):
    config_checks.check_classifier(classifier_config.get_config(variant))


@pytest.mark.parametrize('config,expected,kind', [
    (fc_config.get_config(), 'pretraining', 'pretraining'),
    (classifier_config.get_config(), 'classifier', 'classifier'),
    (reproduce_config.get_config('runlocal'), 'grid', 'grid'),
])
def test_config_kind(config, expected, kind):
  assert config_checks.config_kind(config) == kind
  config_checks.check_kind(config, expected, 'f.py')
  for other in {'pretraining', 'classifier', 'grid'} - {expected}:
    with pytest.raises(UserError, match=f'f.py is a {kind} config, not a {other} config'):
      config_checks.check_kind(config, other, 'f.py')


def test_a_claimed_workdir_is_refused_to_a_second_claim(tmp_path):
  config = fc_config.get_config('runlocal')
  with workdir.claim(tmp_path / 'run', config) as path:
    assert path == tmp_path / 'run'
    with pytest.raises(UserError, match=r'is in use by process \d+ \('):
      with workdir.claim(tmp_path / 'run', config):
        pass
  with workdir.claim(tmp_path / 'run', config):  # released on exit
    pass


def test_differences_read_like_values():
  old = {'optim': {'lr': 0.1, 'name': 'adam'}, 'data': {'source': "npz:it's.npz"},
         'model': {'hidden_dims': [64, 32]}, 'loss': 'l2'}
  new = json.loads(json.dumps(old))
  new['optim']['lr'], new['data']['source'] = 0.2, 'fake'
  new['model']['hidden_dims'], new['seed'] = [8], 1
  assert workdir.differences(old, new) == [
      "data.source (npz:it's.npz there, fake now)", 'model.hidden_dims ([64, 32] there, [8] now)',
      'optim.lr (0.1 there, 0.2 now)', 'seed (<absent> there, 1 now)']


def test_resumed_run_drops_the_records_it_will_write_again(tmp_path):
  writer = MetricWriter(tmp_path)
  for step in (2, 4, 6, 8):
    writer.write(step, step / 4, {'train/loss': float(step)})
  with (tmp_path / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 10, "ep')  # a line cut short by a kill
  writer.drop_after(4)
  assert [r['step'] for r in read_metrics(tmp_path)] == [2, 4]
  writer.drop_after(0)
  assert read_metrics(tmp_path) == []
  writer.close()
