"""Tests of the classifier stage: freezing, caching, heads, kNN, checkpoints, errors."""
import os
import shutil
import time

import jax
import numpy as np
import pytest

from configs import classifier as classifier_config
from mil_jax import checkpoint, classify, optim, sharding
from mil_jax.errors import UserError

from .conftest import latest_params, run_command

CLASSIFY_SCRIPT = 'train_classifier.py'


def clf_config(pretrained, **fields):
  config = classifier_config.get_config('runlocal')
  config.pretrained_path = str(pretrained)
  config.data.fake_train_size = 256
  config.data.fake_test_size = 96
  config.update(fields)
  return config


def pretrained_encoder(pretrained):
  directory, step = checkpoint.find_checkpoint(pretrained)
  return checkpoint.restore_params(directory, step)['encoder']


def test_frozen_probe_keeps_encoder_bit_identical(tmp_path, pretrained):
  config = clf_config(pretrained, mode='probing', freeze=True)
  final = classify.train_and_evaluate(config, tmp_path)
  _, params = latest_params(tmp_path)
  assert set(params) == {'encoder', 'head'}
  jax.tree.map(np.testing.assert_array_equal, params['encoder'], pretrained_encoder(pretrained))
  model_cfg, _, _ = classify.resolve_encoder(config)
  clf = classify.build_classifier(config, model_cfg, 10)
  init, _ = classify._init(clf, config, None, sharding.make_mesh())
  assert not np.allclose(params['head']['dense']['kernel'], init['head']['dense']['kernel'])
  assert (tmp_path / 'accuracy.png').stat().st_size > 0
  assert 0.0 <= final['eval/accuracy'] <= final['eval/top5'] <= 1.0


def test_fine_tune_changes_encoder(tmp_path, pretrained):
  config = clf_config(pretrained, mode='fine_tune', freeze=False)
  classify.train_and_evaluate(config, tmp_path)
  _, params = latest_params(tmp_path)
  encoder = pretrained_encoder(pretrained)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params['encoder'], encoder)
  assert all(jax.tree.leaves(changed))
  assert set(params['head']) == {'hidden', 'out'}


def test_optimizer_state_holds_nothing_for_frozen_leaves(pretrained):
  config = clf_config(pretrained, mode='fine_tune')
  model_cfg, encoder, _ = classify.resolve_encoder(config)
  clf = classify.build_classifier(config, model_cfg, 10)
  params, _ = classify._init(clf, config, encoder, sharding.make_mesh())
  tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=4, total_steps=8,
                               freeze=classify.FREEZE_RULES)
  state = tx.init(params)
  head_size = sum(x.size for x in jax.tree.leaves(params['head']))
  state_size = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert state_size == 2 * head_size  # AdamW's two moments, of the head only


def test_restored_encoder_equals_pretrained(pretrained):
  _, encoder, source = classify.resolve_encoder(clf_config(pretrained))
  assert source.endswith('/checkpoints/4')
  jax.tree.map(np.testing.assert_array_equal, encoder, pretrained_encoder(pretrained))


def test_cached_features_match_recomputed(tmp_path, pretrained):
  results = {}
  for cache in (True, False):
    config = clf_config(pretrained, mode='probing', freeze=True, cache_features=cache)
    config.data.augment = False  # augmentation would make recomputing differ by design
    results[cache] = (classify.train_and_evaluate(config, tmp_path / str(cache)),
                      latest_params(tmp_path / str(cache))[1]['head'])
  for k in results[True][0]:
    assert results[True][0][k] == pytest.approx(results[False][0][k], rel=1e-3, abs=1e-4), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               results[True][1], results[False][1])


def test_linear_probe_learns_fake_classes(tmp_path, pretrained):
  config = clf_config(pretrained, mode='probing', freeze=True, num_epochs=8)
  config.head.batchnorm = True
  config.optim.lr = 1e-2
  final = classify.train_and_evaluate(config, tmp_path)
  assert final['eval/accuracy'] > 0.8


def test_knn_beats_chance(tmp_path, pretrained):
  final = classify.train_and_evaluate(clf_config(pretrained, mode='knn'), tmp_path)
  assert final['eval/knn_accuracy'] > 0.5  # 10 classes: chance is 0.1


def test_from_scratch_needs_no_checkpoint(tmp_path):
  config = clf_config('', mode='fine_tune', freeze=False, from_scratch=True,
                      model_type='conv:192,runlocal', num_epochs=1, runs_dir=str(tmp_path))
  final = classify.train_and_evaluate(config, None)
  assert (tmp_path / 'classify_fine_tune_tuned_conv' / 'accuracy.png').exists()
  assert 0.0 <= final['eval/accuracy'] <= 1.0


def test_attention_choice_of_the_pretraining_run_is_not_inherited(tmp_path):
  """A MAE pretrained with a chosen attention form (e.g. cuDNN on a GPU) loads anywhere."""
  from configs import mae as mae_config  # noqa: PLC0415
  from mil_jax import pretrain  # noqa: PLC0415
  config = mae_config.get_config('seed,runlocal,attention=xla')
  config.num_epochs, config.data.fake_train_size, config.data.fake_test_size = 1, 64, 32
  pretrain.train_and_evaluate(config, tmp_path / 'pretrain_mae')
  model_cfg, params, _ = classify.resolve_encoder(clf_config(tmp_path / 'pretrain_mae'))
  assert model_cfg['name'] == 'mae' and model_cfg['attention'] == 'auto'
  assert set(params) >= {'cls_token', 'transformer'}


def test_newest_run_is_the_default(tmp_path, pretrained):
  for name in ('older', 'newer'):
    shutil.copytree(pretrained, tmp_path / name)
    time.sleep(0.05)
  past = time.time() - 3600
  for step_dir in (tmp_path / 'older' / 'checkpoints').iterdir():
    os.utime(step_dir, (past, past))
  assert classify.newest_pretraining_run(tmp_path) == tmp_path / 'newer'


@pytest.mark.parametrize('fields,message', [
    (dict(pretrained_path='', runs_dir='/nonexistent/runs'), 'no pretraining run found'),
    (dict(pretrained_path='/nonexistent/run'), 'does not exist'),
    (dict(model_type='fc'), "holds a model with name 'conv'"),
    (dict(model_type='conv:256,runlocal'), 'start_filters 6'),
    (dict(from_scratch=True, model_type='conv', freeze=True), '--freeze with --from_scratch'),
    (dict(mode='svm'), 'unknown mode'),
])
def test_errors(tmp_path, pretrained, fields, message):
  config = clf_config(pretrained, **fields)
  with pytest.raises(UserError, match=message):
    classify.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / 'config.json').exists()  # nothing written before the check


def test_not_a_checkpoint(tmp_path, pretrained):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='holds no complete checkpoint'):
    classify.train_and_evaluate(clf_config(pretrained, pretrained_path=str(tmp_path / 'empty')),
                                tmp_path / 'out')


def test_command_line(tmp_path, pretrained):
  runs = tmp_path / 'runs'
  shutil.copytree(pretrained, runs / 'pretrain_conv')
  args = [CLASSIFY_SCRIPT, '--mode', 'probing', '--num_epochs', '1',
          '--config', 'configs/classifier.py:runlocal', f'--config.runs_dir={runs}']
  out = run_command(args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'using the newest pretraining run: {runs / "pretrain_conv"}' in out.stdout
  assert (runs / 'classify_probing_frozen_conv' / 'metrics.jsonl').exists()
  # --type names the encoder here (it picks the config only in train_pretrain.py).
  out = run_command([CLASSIFY_SCRIPT, '--mode', 'fine_tune', '--from_scratch', '--type',
                     'conv:192,runlocal', '--num_epochs', '1', '--config.data.source=fake',
                     '--config.data.fake_train_size=256', f'--workdir={tmp_path / "scratch"}'])
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / 'scratch' / 'accuracy.png').exists()
  out = run_command([*args, '--from_scratch', '--type', 'conv', '--freeze'])
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      'error: --freeze with --from_scratch would train a head on random features; '
      'pass --nofreeze, or drop --from_scratch.']
