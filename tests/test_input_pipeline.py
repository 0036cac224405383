"""Tests of mil_jax.input_pipeline: sources, splits, order, batches, augmentation."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mil_jax import input_pipeline as ip
from mil_jax import sharding
from mil_jax.errors import UserError


def _data(**overrides):
  cfg = common.data_config()
  cfg.update(overrides)
  return cfg


def _write_npz(path, n_train=100, n_test=20, **extra):
  rng = np.random.default_rng(0)
  arrays = dict(
      x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
      y_train=rng.integers(0, 7, n_train),
      x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
      y_test=rng.integers(0, 7, n_test))
  arrays.update(extra)
  np.savez(path, **arrays)
  return arrays


# ---------------------------------------------------------------- sources


def test_tfds_cifar100_through_mock(monkeypatch):
  import tensorflow_datasets as tfds
  # The mock stands in for the download; keep the reachability probe out of it.
  monkeypatch.setattr(ip, '_check_network', lambda builder: None)
  with tfds.testing.mock_data(num_examples=40):
    split = ip.load_split(_data(data_dir='/nonexistent/tfds'), 'train')
  assert split.images.shape == (40, 32, 32, 3)
  assert split.images.dtype == np.uint8
  assert split.labels.dtype == np.int32
  assert split.num_classes == 100
  assert 0 <= split.labels.min() and split.labels.max() < 100


def test_tfds_prepared_directory_with_split_slicing(tmp_path):
  """A CIFAR-10 written on disk by TFDS itself, read through data_dir by the registered builder."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 50)
  cifar10 = tfds.builder('cifar10', data_dir=str(tmp_path / 'unused'))
  examples = lambda rows: [(i, {'id': f'{i:05d}', 'image': images[i], 'label': int(labels[i])})
                           for i in rows]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='cifar10', version=str(cifar10.version), features=cifar10.info.features,
      split_datasets={'train': examples(range(40)), 'test': examples(range(40, 50))},
      data_dir=str(tmp_path / 'tfds'), disable_shuffling=True)
  assert type(tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds'))) is type(cifar10)

  cfg = _data(source='tfds:cifar10', data_dir=str(tmp_path / 'tfds'), download=False)
  for split, rows in [('train[10:30]', slice(10, 30)), ('train[:25%]', slice(0, 10)),
                      ('train[-5:]', slice(35, 40)), ('test', slice(40, 50))]:
    got = ip.load_split(cfg, split)
    np.testing.assert_array_equal(got.images, images[rows], err_msg=split)
    np.testing.assert_array_equal(got.labels, labels[rows], err_msg=split)
    assert got.labels.dtype == np.int32 and got.num_classes == 10
  with pytest.raises(UserError, match="no split 'validation'"):
    ip.load_split(cfg, 'validation')


def test_tfds_not_prepared_without_download(tmp_path):
  with pytest.raises(UserError, match='not prepared'):
    ip.load_split(_data(data_dir=str(tmp_path), download=False), 'train')


def test_tfds_unreachable_download_fails_fast(tmp_path, monkeypatch):
  import time

  import tensorflow_datasets as tfds
  builder_cls = type(tfds.builder('cifar10', data_dir=str(tmp_path)))
  # '.invalid' never resolves (RFC 2606), so this holds on machines with a network too.
  monkeypatch.setattr(builder_cls, 'url_infos', {'https://host.invalid/cifar.tar.gz': None})
  start = time.monotonic()
  with pytest.raises(UserError, match='cannot reach host.invalid.*tfds build cifar10'):
    ip.load_split(_data(source='tfds:cifar10', data_dir=str(tmp_path)), 'train')
  assert time.monotonic() - start < 30


def test_tfds_unknown_name():
  with pytest.raises(UserError, match='no data set named'):
    ip.load_split(_data(source='tfds:no_such_dataset_xyz'), 'train')


def test_npz_source_and_slices(tmp_path):
  arrays = _write_npz(tmp_path / 'd.npz')
  cfg = _data(source=f'npz:{tmp_path / "d.npz"}')
  full = ip.load_split(cfg, 'train')
  np.testing.assert_array_equal(full.images, arrays['x_train'])
  assert full.labels.dtype == np.int32 and full.num_classes == 7
  head, tail = ip.load_split(cfg, 'train[:80]'), ip.load_split(cfg, 'train[80:]')
  assert len(head) == 80 and len(tail) == 20
  np.testing.assert_array_equal(np.concatenate([head.labels, tail.labels]), full.labels)
  assert len(ip.load_split(cfg, 'train[:90%]')) == 90
  assert len(ip.load_split(cfg, 'train[-10:]')) == 10
  np.testing.assert_array_equal(ip.load_split(cfg, 'test').images, arrays['x_test'])


@pytest.mark.parametrize('problem,extra,message', [
    ('missing', None, 'does not exist'),
    ('keys', {'x_train': None}, 'has no split'),
    ('dtype', {'x_train': np.zeros((4, 32, 32, 3), np.float32)}, 'uint8'),
    ('shape', {'x_train': np.zeros((4, 28, 28), np.uint8)}, r'\[N, 32, 32, 3\]'),
    ('labels', {'y_train': np.zeros((3,), np.int64)}, 'one integer label per image'),
])
def test_npz_errors(tmp_path, problem, extra, message):
  path = tmp_path / 'd.npz'
  if problem != 'missing':
    arrays = _write_npz(path, n_train=4)
    for key, value in extra.items():
      if value is None:
        arrays.pop(key)
      else:
        arrays[key] = value
    np.savez(path, **arrays)
  with pytest.raises(UserError, match=message):
    ip.load_split(_data(source=f'npz:{path}'), 'train')


def test_fake_source_is_deterministic_and_learnable():
  cfg = _data(source='fake')
  a, b = ip.load_split(cfg, 'train'), ip.load_split(cfg, 'train')
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  test = ip.load_split(cfg, 'test')
  assert len(a) == cfg.fake_train_size and len(test) == cfg.fake_test_size
  assert not np.array_equal(a.images[:len(test)], test.images)
  # Nearest class mean on raw pixels separates the classes: the structure is learnable.
  x = a.images.reshape(len(a), -1).astype(np.float32)
  means = np.stack([x[a.labels == c].mean(0) for c in range(a.num_classes)])
  xt = test.images.reshape(len(test), -1).astype(np.float32)
  pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == test.labels).mean() > 0.8


@pytest.mark.parametrize('source,split,message', [
    ('imagenet', 'train', 'unknown data source'),
    ('fake', 'validation', "splits 'train' and 'test'"),
    ('fake', 'train[5:5]', 'is empty'),
    ('fake', 'train[::2]', 'not understood'),
    ('fake', 'train[:10%:]', 'not understood'),
])
def test_source_and_split_errors(source, split, message):
  with pytest.raises(UserError, match=message):
    ip.load_split(_data(source=source), split)


def test_parse_split():
  assert ip.parse_split('train') == ('train', None, False)
  assert ip.parse_split('train[:45000]') == ('train', slice(None, 45000), False)
  assert ip.parse_split('train[45000:]') == ('train', slice(45000, None), False)
  assert ip.parse_split('train[10%:90%]') == ('train', slice(10, 90), True)


# ---------------------------------------------------------------- order and batches


def test_epoch_permutation_reproducible_and_varies():
  p0 = np.asarray(ip.epoch_permutation(0, 0, 1000))
  np.testing.assert_array_equal(p0, np.asarray(ip.epoch_permutation(0, 0, 1000)))
  assert sorted(p0.tolist()) == list(range(1000))
  assert not np.array_equal(p0, np.asarray(ip.epoch_permutation(0, 1, 1000)))
  assert not np.array_equal(p0, np.asarray(ip.epoch_permutation(1, 0, 1000)))


def test_train_batches_drop_last_partial_and_cover_distinct_examples():
  split = ip.load_split(_data(source='fake', fake_train_size=100), 'train')
  data = ip.DeviceSplit.create(split, sharding.make_mesh())
  batch = 32
  steps = ip.steps_per_epoch(len(data), batch)
  assert steps == 3
  perm = ip.epoch_permutation(0, 0, len(data))
  gather = jax.jit(ip.train_batch, static_argnums=3)
  seen = []
  for i in range(steps):
    images, labels = gather(data, perm, jnp.int32(i), batch)
    assert images.shape == (batch, 32, 32, 3) and images.dtype == jnp.uint8
    idx = np.asarray(perm[i * batch:(i + 1) * batch])
    np.testing.assert_array_equal(np.asarray(labels), split.labels[idx])
    seen.extend(idx.tolist())
  assert len(set(seen)) == 96


@pytest.mark.parametrize('n,batch', [(10, 4), (12, 4), (1, 8), (100, 7)])
def test_eval_indices_cover_every_example_once(n, batch):
  idx, valid = ip.eval_indices(n, batch)
  assert idx.shape == valid.shape and idx.shape[1] == batch
  assert sorted(idx[valid].tolist()) == list(range(n))
  assert valid.sum() == n and idx.max() < n


def test_augment_keeps_shape_dtype_and_moves_pixels():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
  out = ip.augment(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert not np.array_equal(np.asarray(out), np.asarray(images))
  # Flip only: every image is itself or its mirror, and both happen.
  flipped = np.asarray(ip.augment(jax.random.key(1), images, crop_padding=0))
  same = (flipped == np.asarray(images)).all(axis=(1, 2, 3))
  mirror = (flipped == np.asarray(images)[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same | mirror).all() and same.any() and mirror.any()
  # Crop only: each output is a 32x32 window of the zero-padded image.
  cropped = np.asarray(ip.augment(jax.random.key(2), images, flip=False))
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for img, pad in zip(cropped[:8], padded[:8]):
    assert any(np.array_equal(img, pad[i:i + 32, j:j + 32]) for i in range(9) for j in range(9))


def test_to_float_range():
  x = ip.to_float(jnp.asarray([0, 255], jnp.uint8))
  np.testing.assert_allclose(np.asarray(x), [-1.0, 1.0])
  batch = ip.prepare_batch(jax.random.key(0), jnp.zeros((2, 32, 32, 3), jnp.uint8),
                           augment_images=True, dtype=jnp.bfloat16)
  assert batch.dtype == jnp.bfloat16 and float(batch.min()) >= -1.0


@pytest.mark.slow
def test_real_cifar10_copy(cifar10_npz: pathlib.Path):
  cfg = _data(source=f'npz:{cifar10_npz}')
  train, val = ip.load_split(cfg, 'train[:45000]'), ip.load_split(cfg, 'train[45000:]')
  assert len(train) == 45000 and len(val) == 5000 and train.num_classes == 10
  assert set(np.unique(val.labels).tolist()) == set(range(10))
