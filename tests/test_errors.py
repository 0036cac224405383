"""Every mistake a user can make gets one sentence and exit code 2 (real commands)."""
import json

import numpy as np
import pytest

from configs import conv as conv_config

from .conftest import run_command

TINY = ['--config', 'configs/conv.py:192,runlocal']
PRETRAIN, CLASSIFY = 'train_pretrain.py', 'train_classifier.py'


def assert_one_sentence(out, message):
  assert out.returncode == 2, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith('error: ') and message in lines[0], lines[0]
  assert 'Traceback' not in out.stderr


@pytest.mark.parametrize('args,message', [
    (['--type', 'vit'], "unknown --type 'vit'"),
    (['--config', 'configs/mae.py:huge'], "unknown variant 'huge'"),
    ([*TINY, '--config.model.name=vit'], "unknown model name 'vit'"),
    ([*TINY, '--config.optim.lrr=1'], 'the config has no field'),
    ([*TINY, '--config.batch_size=abc'], 'batch_size'),
    (['--config', 'configs/mae.py:runlocal', '--config.model.mask_ratio=1.0'],
     'mask_ratio must be in [0, 1)'),
    (['--config', 'configs/mae.py:runlocal', '--config.model.patch_size=5'],
     'patch_size 5 must divide'),
    ([*TINY, '--config.batch_size=0'], 'batch_size must be at least 1'),
    ([*TINY, '--config.num_epochs=0'], 'num_epochs must be at least 1'),
    ([*TINY, '--config.optim.name=lamb'], "unknown optim.name 'lamb'"),
    ([*TINY, '--config.data.source=imagenet'], "unknown data source 'imagenet'"),
    ([*TINY, '--config.data.source=npz:/nonexistent/x.npz'], 'does not exist'),
    ([*TINY, '--config.data.eval_split=validation'], "splits 'train' and 'test'"),
    ([*TINY, '--config.data.source=tfds:cifar10', '--config.data.download=False',
      '--config.data.data_dir=/nonexistent/tfds'], 'is not prepared'),
    (['--config', 'configs/nope.py'], 'does not exist'),
    (['--workdir'], 'workdir'),
    ([*TINY, '--config.optim.lrr=1'], 'the config has no field lrr (did you mean lr?);'),
    (['--config', 'configs/classifier.py'],
     'configs/classifier.py is a classifier config, not a pretraining config'),
    (['--config', 'configs/reproduce.py:runlocal'], 'is a grid config, not a pretraining'),
    (['--type', 'fc', *TINY], '--type fc contradicts --config, which is a conv config'),
    ([*TINY, '--config.optim.lr=-1e-3'], 'optim.lr must be a finite number above 0'),
    ([*TINY, '--config.loss=l3'], "unknown loss 'l3'"),
    ([*TINY, '--config.checkpoint_every_steps=-1'], 'checkpoint_every_steps must be at least 0'),
    ([*TINY, '--config.data.train_split=train[:150%]'], 'percentage outside -100% to 100%'),
    (['--config', 'configs/fc.py:runlocal', '--config.loss=masked_l2'],
     "loss 'masked_l2' needs a masked autoencoder"),
])
def test_pretrain_mistakes(tmp_path, args, message):
  out = run_command([PRETRAIN, *args] if '--workdir' in args else
                    [PRETRAIN, *args, f'--workdir={tmp_path / "run"}'])
  assert_one_sentence(out, message)
  assert not (tmp_path / 'run').exists()  # nothing written for a rejected command


def _bad_npz_files(directory):
  """Files a user might pass as ``npz:``, none of which holds usable arrays."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 16)
  np.savez(directory / 'good.npz', x_train=images, y_train=labels)
  whole = (directory / 'good.npz').read_bytes()
  (directory / 'truncated.npz').write_bytes(whole[:len(whole) // 2])
  np.save(directory / 'array.npy', images)
  np.savez(directory / 'objects.npz', x_train=np.array([images, None], dtype=object),
           y_train=labels)
  np.savez(directory / 'negative.npz', x_train=images, y_train=labels - 5)


@pytest.mark.parametrize('name,message', [
    ('truncated.npz', 'is not a numpy .npz archive'),
    ('array.npy', 'is not a numpy .npz archive'),
    ('objects.npz', 'holds Python objects'),
    ('negative.npz', 'holds the negative label -5'),
])
def test_npz_files_of_the_wrong_kind(tmp_path, name, message):
  _bad_npz_files(tmp_path)
  out = run_command([PRETRAIN, *TINY, f'--config.data.source=npz:{tmp_path / name}',
                     f'--workdir={tmp_path / "run"}'])
  assert_one_sentence(out, message)
  assert not (tmp_path / 'run').exists()


def test_unreadable_config_json_and_overlong_names(tmp_path):
  (tmp_path / 'config.json').write_text('{"seed": 0, "model": ')
  out = run_command([PRETRAIN, *TINY, f'--workdir={tmp_path}'])
  assert_one_sentence(out, 'config.json cannot be read')
  assert '--overwrite' in out.stderr
  assert (tmp_path / 'config.json').read_text() == '{"seed": 0, "model": '
  out = run_command([PRETRAIN, *TINY, f'--workdir={tmp_path / ("a" * 300)}'])
  assert_one_sentence(out, 'longer than 255 bytes')


def test_batch_not_divisible_by_devices(tmp_path):
  out = run_command([PRETRAIN, *TINY, '--config.batch_size=12', f'--workdir={tmp_path}'],
                    env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert_one_sentence(out, 'multiple of 8')


def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
  stored = json.loads(conv_config.get_config('192,runlocal').to_json())
  stored['seed'], stored['model']['start_filters'] = 1, 99
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n')
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)  # it saved a training step
  out = run_command([PRETRAIN, *TINY, f'--workdir={tmp_path}'])
  assert_one_sentence(
      out, 'holds a run of a different config (model.start_filters (99 there, 6 now); ')
  assert '; seed (1 there, 0 now))' in out.stderr and '--overwrite' in out.stderr
  assert json.loads((tmp_path / 'config.json').read_text())['seed'] == 1
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1}\n'


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  out = run_command([PRETRAIN, *TINY, f'--workdir={blocker / "run"}'])
  assert_one_sentence(out, 'cannot write to workdir')
  assert blocker.read_text() == 'not a directory'


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  out = run_command([PRETRAIN, *TINY, '--config.optim.lr=1e12', '--config.checkpoint_every_steps=1',
                     '--config.log_every_steps=1', '--config.steps_per_dispatch=1',
                     f'--workdir={tmp_path}'])
  assert_one_sentence(out, 'the training loss became')
  step = int(out.stderr.split(' at step ')[1].split(';')[0])
  assert step >= 2
  kept = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert kept and max(kept) == step - 1  # the step before the bad one, and nothing after


def test_debug_shows_the_traceback(tmp_path):
  out = run_command([PRETRAIN, *TINY, '--config.data.source=imagenet', '--debug',
                     f'--workdir={tmp_path}'])
  assert out.returncode == 2 and 'Traceback' in out.stderr and 'UserError' in out.stderr


@pytest.mark.parametrize('args,message', [
    (['--mode', 'svm'], "unknown mode 'svm'"),
    (['--pretrained_path', '/nonexistent/run'], 'does not exist'),
    (['--type', 'fc'], "holds a model with name 'conv'"),
    (['--from_scratch', '--type', 'conv', '--freeze'], '--freeze with --from_scratch'),
    (['--from_scratch'], '--from_scratch needs --type'),
    (['--type', 'vit', '--from_scratch'], "unknown model type 'vit'"),
    (['--config', 'configs/classifier.py:fast'], "unknown variant 'fast'"),
    (['--config', 'configs/fc.py'], 'configs/fc.py is a pretraining config, not a classifier'),
    (['--no-freeze'], 'unknown flag --no-freeze; booleans are negated as --nofreeze.'),
    (['--mode', 'knn', '--config.knn.k=-5'], 'knn.k must be at least 1'),
    (['--mode', 'knn', '--config.knn.k=0'], 'knn.k must be at least 1'),
    (['--mode', 'fine_tune', '--config.head.dropout_rate=1.5'], 'head.dropout_rate must be in'),
])
def test_classifier_mistakes(tmp_path, pretrained, args, message):
  base = ['--config', 'configs/classifier.py:runlocal', f'--workdir={tmp_path / "run"}']
  if '--pretrained_path' not in args and '--from_scratch' not in args:
    base.append(f'--pretrained_path={pretrained}')
  out = run_command([CLASSIFY, *base, *args])
  assert_one_sentence(out, message)
  assert not (tmp_path / 'run').exists()


def test_classifier_without_any_run_or_checkpoint(tmp_path):
  base = [CLASSIFY, '--config', 'configs/classifier.py:runlocal']
  out = run_command([*base, f'--config.runs_dir={tmp_path / "none"}'])
  assert_one_sentence(out, 'no pretraining run found')
  (tmp_path / 'empty').mkdir()
  out = run_command([*base, f'--pretrained_path={tmp_path / "empty"}'])
  assert_one_sentence(out, 'holds no complete checkpoint')
