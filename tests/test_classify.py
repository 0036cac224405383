"""Tests of the classifier stage: freezing, caching, heads, kNN, checkpoints, errors."""
import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from configs import classifier as classifier_config
from mil_jax import classify, optim, sharding
from mil_jax import input_pipeline as ip
from mil_jax.errors import UserError
from mil_jax.metric_writers import read_metrics

from .conftest import (
  assert_picture,
  checkpoint_steps,
  latest_params,
  read_checkpoint_item,
  run_command,
)

CLASSIFY_SCRIPT = 'train_classifier.py'


def clf_config(pretrained, **fields):
  config = classifier_config.get_config('runlocal')
  config.pretrained_path = str(pretrained)
  config.data.fake_train_size = 256
  config.data.fake_test_size = 96
  config.update(fields)
  return config


def pretrained_encoder(pretrained):
  """The encoder of the fixture's pretraining run (one checkpoint), read by orbax alone."""
  [step] = checkpoint_steps(pretrained)
  return read_checkpoint_item(pretrained / 'checkpoints' / str(step))['encoder']


@pytest.mark.parametrize('augment', [False, True], ids=['plain', 'augment'])
@pytest.mark.parametrize('cache', [True, False], ids=['cached', 'not_cached'])
@pytest.mark.parametrize('mode', ['probing', 'fine_tune'])
def test_frozen_encoder_stays_bit_identical(tmp_path, pretrained, mode, cache, augment):
  config = clf_config(pretrained, mode=mode, freeze=True, cache_features=cache, num_epochs=1)
  config.data.update(augment=augment, fake_train_size=64, fake_test_size=32)
  final = classify.train_and_evaluate(config, tmp_path)
  # Both sides read by orbax alone.
  want = pretrained_encoder(pretrained)
  params = read_checkpoint_item(tmp_path / 'checkpoints' / str(checkpoint_steps(tmp_path)[-1]))
  assert set(params) == {'encoder', 'head'}
  jax.tree.map(np.testing.assert_array_equal, params['encoder'], want)
  # ...while the head did train.
  model_cfg = classify.resolve_encoder(config).model
  clf = classify.build_classifier(config, model_cfg, 10)
  init, _ = classify._init(clf, config, None, sharding.make_mesh())
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), params['head'], init['head'])
  assert all(jax.tree.leaves(moved))
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
  model_cfg, encoder, _, _ = classify.resolve_encoder(config)
  clf = classify.build_classifier(config, model_cfg, 10)
  params, _ = classify._init(clf, config, encoder, sharding.make_mesh())
  tx, _ = optim.make_optimizer(config.optim, params, steps_per_epoch=4, total_steps=8,
                               freeze=classify.FREEZE_RULES)
  state = tx.init(params)
  head_size = sum(x.size for x in jax.tree.leaves(params['head']))
  state_size = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert state_size == 2 * head_size  # AdamW's two moments, of the head only


def test_restored_encoder_equals_pretrained(pretrained):
  _, encoder, source, _ = classify.resolve_encoder(clf_config(pretrained))
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
  assert read_metrics(tmp_path) == [{'step': 0, 'epoch': 0.0,
                                     'eval/knn_accuracy': final['eval/knn_accuracy']}]


def brute_force_knn_hits(train_f, train_y, test_f, test_y, *, k, temperature, num_classes):
  """Per test row, whether weighted k-NN is right: float64, one row at a time.

  Returns ``(hits [T] bool, the smallest gap between the k-th and the next
  similarity, the smallest relative gap between the two best classes' votes)``;
  the gaps show that float32 rounding in the code under test cannot change
  a neighbour or a winner.
  """
  unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
  sims = unit(test_f.astype(np.float64)) @ unit(train_f.astype(np.float64)).T
  k = min(k, len(train_f))
  hits, neighbour_gap, vote_gap = [], np.inf, np.inf
  for row, label in zip(sims, test_y):
    order = np.argsort(-row)
    if k < len(row):
      neighbour_gap = min(neighbour_gap, row[order[k - 1]] - row[order[k]])
    votes = np.zeros(num_classes)
    for j in order[:k]:
      votes[train_y[j]] += np.exp(row[j] / temperature)
    first, second = np.sort(votes)[::-1][:2]
    vote_gap = min(vote_gap, (first - second) / first)
    hits.append(int(np.argmax(votes)) == label)
  return np.array(hits), neighbour_gap, vote_gap


@pytest.mark.parametrize('k', [500, 7], ids=['k_above_train_size', 'k_7'])
def test_knn_accuracy_equals_brute_force(k):
  rng = np.random.default_rng(3)
  num_classes, temperature, batch = 5, 0.07, 16
  train_f = rng.normal(size=(50, 24)) * rng.uniform(0.1, 10.0, size=(50, 1))  # varied norms
  test_f = rng.normal(size=(37, 24)) * rng.uniform(0.1, 10.0, size=(37, 1))   # 37 = 2 x 16 + 5
  train_y, test_y = rng.integers(0, num_classes, 50), rng.integers(0, num_classes, 37)
  # The last test row, the one the padding of the last batch repeats, is a
  # near copy of a training row of its class: a sure hit, so counting its
  # padded copies would move the accuracy.
  test_f[-1], test_y[-1] = 3.0 * train_f[4] + 0.01 * rng.normal(size=24), train_y[4]
  hits, neighbour_gap, vote_gap = brute_force_knn_hits(
      train_f, train_y, test_f, test_y, k=k, temperature=temperature, num_classes=num_classes)
  assert hits[-1] and 0 < hits.mean() < 1
  assert neighbour_gap > 1e-4 and vote_gap > 1e-3

  mesh = sharding.make_mesh()
  split = lambda f, y: ip.DeviceSplit.create(
      ip.Split(f.astype(np.float32), y.astype(np.int32), num_classes), mesh)
  accuracy = classify.knn_accuracy(split(train_f, train_y), split(test_f, test_y), k=k,
                                   temperature=temperature, batch_size=batch)
  assert float(accuracy) == np.float32(hits.sum()) / np.float32(len(hits))


def test_from_scratch_needs_no_checkpoint(tmp_path):
  config = clf_config('', mode='fine_tune', freeze=False, from_scratch=True,
                      model_type='conv:192,runlocal', num_epochs=1, runs_dir=str(tmp_path))
  final = classify.train_and_evaluate(config, None)
  workdir = tmp_path / 'classify_fine_tune_scratch_conv'
  assert_picture(workdir / 'accuracy.png', curves=2)
  assert 0.0 <= final['eval/accuracy'] <= 1.0
  last = read_metrics(workdir)[-1]
  assert last['epoch'] == 1.0
  assert {k: last[k] for k in final} == pytest.approx(final, rel=1e-6)


def test_attention_choice_of_the_pretraining_run_is_not_inherited(tmp_path):
  """A MAE pretrained with a chosen attention form (e.g. cuDNN on a GPU) loads anywhere."""
  from configs import mae as mae_config  # noqa: PLC0415
  from mil_jax import pretrain  # noqa: PLC0415
  config = mae_config.get_config('seed,runlocal,attention=xla')
  config.num_epochs, config.data.fake_train_size, config.data.fake_test_size = 1, 64, 32
  pretrain.train_and_evaluate(config, tmp_path / 'pretrain_mae')
  model_cfg, params, _, _ = classify.resolve_encoder(clf_config(tmp_path / 'pretrain_mae'))
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
  workdir = runs / 'classify_probing_frozen_conv'
  assert f'encoder: conv from {runs / "pretrain_conv" / "checkpoints" / "4"}' in out.stdout
  stored = json.loads((workdir / 'config.json').read_text())
  assert (stored['mode'], stored['freeze'], stored['num_epochs']) == ('probing', True, 1)
  last = read_metrics(workdir)[-1]
  assert last['epoch'] == 1.0 and 0.0 <= last['eval/accuracy'] <= last['eval/top5'] <= 1.0
  assert f"eval/accuracy {last['eval/accuracy']:.4g}" in out.stdout
  # --type names the encoder here (it picks the config only in train_pretrain.py).
  out = run_command([CLASSIFY_SCRIPT, '--mode', 'fine_tune', '--from_scratch', '--type',
                     'conv:192,runlocal', '--num_epochs', '1', '--config.data.source=fake',
                     '--config.data.fake_train_size=256', f'--workdir={tmp_path / "scratch"}'])
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'encoder: conv from a fresh conv:192,runlocal encoder' in out.stdout
  assert_picture(tmp_path / 'scratch' / 'accuracy.png', curves=2)
  assert read_metrics(tmp_path / 'scratch')[-1]['epoch'] == 1.0
  out = run_command([*args, '--from_scratch', '--type', 'conv', '--freeze'])
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      'error: --freeze with --from_scratch would train a head on random features; '
      'pass --nofreeze, or drop --from_scratch.']
