"""The best checkpoint: kept on disk, found, and the one a classifier's encoder comes from."""
import jax
import numpy as np
import pytest

from configs import classifier as classifier_config
from configs import fc as fc_config
from mil_jax import checkpoint, classify, pretrain
from mil_jax.metric_writers import read_metrics

from .conftest import checkpoint_steps, read_checkpoint_item


def record_saves(monkeypatch) -> dict:
  """``{step: (params, metrics)}`` of every save that follows, copied to the host as it happens.

  Captured in memory, so the expected parameters owe nothing to how
  checkpoints are written, kept, found or restored.
  """
  saves = {}
  original = checkpoint.save

  def save(mngr, step, *, params, metrics=None, **kwargs):
    saves[step] = (jax.tree.map(lambda x: np.array(x, copy=True), params), metrics)
    original(mngr, step, params=params, metrics=metrics, **kwargs)

  monkeypatch.setattr(checkpoint, 'save', save)
  return saves


def equal_trees(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_classifier_encoder_is_the_best_epoch_not_the_last(tmp_path, monkeypatch, capsys):
  saves = record_saves(monkeypatch)
  config = fc_config.get_config('l2,runlocal')
  config.num_epochs = 4
  config.data.fake_train_size, config.data.fake_test_size = 128, 40
  # The learning rate grows 30x an epoch (1e-3, 0.03, 0.9, 27): Adam first
  # improves the reconstruction, then wrecks it, so the last epoch is not the best.
  config.optim.update(lr=1e-3, schedule='exponential', decay_rate=30.0)
  pretrain.train_and_evaluate(config, tmp_path / 'pretrain')

  eval_loss = {r['step']: r['eval/loss'] for r in read_metrics(tmp_path / 'pretrain')
               if 'eval/loss' in r}
  assert list(eval_loss) == [4, 8, 12, 16]
  best = min(eval_loss, key=eval_loss.get)
  assert best != 16, f'the arranged run ended at its best epoch: {eval_loss}'
  # Saved: the best state (kept until the next save) and the last.
  assert sorted(saves) == sorted({best, 16})
  assert {s: m['eval/loss'] for s, (_, m) in saves.items()} == pytest.approx(
      {s: eval_loss[s] for s in saves})
  best_encoder, last_encoder = saves[best][0]['encoder'], saves[16][0]['encoder']
  assert not equal_trees(best_encoder, last_encoder)
  # On disk: the latest (to resume) and the best, nothing else.
  assert checkpoint_steps(tmp_path / 'pretrain') == [best, 16]
  on_disk = read_checkpoint_item(tmp_path / 'pretrain' / 'checkpoints' / str(best))
  assert equal_trees(on_disk['encoder'], best_encoder)

  saves.clear()
  clf = classifier_config.get_config('runlocal')
  clf.update(mode='probing', freeze=True, num_epochs=1, pretrained_path=str(tmp_path / 'pretrain'))
  clf.data.fake_train_size, clf.data.fake_test_size = 64, 32
  classify.train_and_evaluate(clf, tmp_path / 'probe')
  out = capsys.readouterr().out
  assert f'encoder: fc from {tmp_path / "pretrain" / "checkpoints" / str(best)}\n' in out
  # The frozen encoder the classifier trained over, as it saved it.
  trained_over = saves[max(saves)][0]['encoder']
  assert equal_trees(trained_over, best_encoder), (
      f'the classifier did not load the best epoch (step {best} of {list(eval_loss)})')
