"""Images on the device: load a split once, then gather and augment in jit.

CIFAR is 150 MB, so no input pipeline beats "already on the accelerator".
A split is read once into uint8 ``[N, 32, 32, 3]`` plus int32 labels
(:func:`load_split`), copied to every device once (:class:`DeviceSplit`),
and each train step gathers its batch by index from an epoch permutation that
depends only on ``(seed, epoch)`` (:func:`epoch_permutation`), so a run is
reproducible and can resume mid-epoch. Evaluation walks fixed, padded index
batches with a validity mask (:func:`eval_indices`) so that every example
counts exactly once.

Sources (``config.data.source``):
  ``tfds:<name>``  any TFDS image classification set of 32x32x3 images.
  ``npz:<path>``   keras-style arrays ``x_train``, ``y_train`` [, ``x_test``, ``y_test``].
  ``fake``         deterministic synthetic images with learnable classes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse
import zipfile
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mil_jax import sharding
from mil_jax.errors import UserError
from mil_jax.images import IMAGE_SHAPE

_SPLIT_RE = re.compile(r'^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$')
_NETWORK_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in host memory.

  Attributes:
    images: uint8 ``[N, 32, 32, 3]``, RGB.
    labels: int32 ``[N]``.
    num_classes: the number of classes of the data set (not of this split).
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  def __len__(self) -> int:
    return len(self.labels)


# --------------------------------------------------------------------------
# Split strings.


def parse_split(split: str) -> tuple[str, slice | None, bool]:
  """Parses a TFDS-style split string.

  Args:
    split: ``'train'``, ``'test'``, ``'train[:45000]'``, ``'train[45000:]'``,
      ``'train[:90%]'``, ``'train[10%:-10%]'``.

  Returns:
    ``(name, slice or None, in_percent)``.
  """
  m = _SPLIT_RE.match(split.replace(' ', ''))
  if not m:
    raise UserError(
        f"split {split!r} is not understood; write it like 'train', "
        "'train[:45000]' or 'train[:90%]'.")
  name, start, pct_a, stop, pct_b = m.groups()
  if split.find('[') < 0:
    return name, None, False
  if (start and stop and pct_a != pct_b) or (pct_a and not start) or (pct_b and not stop):
    raise UserError(f"split {split!r} mixes percent and absolute bounds; use one kind.")
  percent = bool(pct_a or pct_b)
  bounds = [int(v) for v in (start, stop) if v]
  if percent and any(abs(v) > 100 for v in bounds):
    raise UserError(f'split {split!r} has a percentage outside -100% to 100%.')
  return name, slice(int(start) if start else None, int(stop) if stop else None), percent


def _apply_slice(n: int, sl: slice | None, percent: bool) -> slice:
  if sl is None:
    return slice(0, n)
  if percent:
    # Same rounding as TFDS ("closest"), so 'train[:90%]' is the same rows everywhere.
    to_abs = lambda v: None if v is None else int(round(v * n / 100))
    sl = slice(to_abs(sl.start), to_abs(sl.stop))
  return slice(*sl.indices(n)[:2])


# --------------------------------------------------------------------------
# Sources.


def _check_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> None:
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise UserError(
        f'{where} holds images of dtype {images.dtype} and shape {images.shape}; '
        f'mil_jax needs uint8 images of shape [N, 32, 32, 3].')
  if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
    raise UserError(
        f'{where} holds labels of dtype {labels.dtype} and shape {labels.shape}; '
        f'mil_jax needs one integer label per image ({len(images)}).')
  if labels.size and labels.min() < 0:
    raise UserError(f'{where} holds the negative label {labels.min()}; labels are class '
                    'indices 0, 1, 2, ...')


def _load_npz(path: str, name: str) -> tuple[np.ndarray, np.ndarray, int]:
  if not os.path.isfile(path):
    raise UserError(f'npz file {path} does not exist; check data.source=npz:<path>.')
  if not zipfile.is_zipfile(path):
    raise UserError(f'{path} is not a numpy .npz archive (a zip of arrays, as written by '
                    'numpy.savez); convert it with numpy.savez(path, x_train=..., y_train=...).')
  try:
    with np.load(path, allow_pickle=False) as arrays:
      keys = set(arrays.files)
      if not {f'x_{name}', f'y_{name}'} <= keys:
        have = sorted(k[2:] for k in keys if k.startswith('x_') and f'y_{k[2:]}' in keys)
        raise UserError(
            f'npz file {path} has no split {name!r} (arrays x_{name} and y_{name}); '
            f'it has: {", ".join(have) or "none"}.')
      images, labels = arrays[f'x_{name}'], arrays[f'y_{name}']
      _check_arrays(images, labels, f'npz file {path} split {name!r}')
      all_labels = [arrays[k] for k in sorted(keys) if k.startswith('y_')]
  except UserError:
    raise
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise UserError(f'npz file {path} holds Python objects, not plain arrays; mil_jax needs '
                      'uint8 images and integer labels.') from None
    raise UserError(f'npz file {path} is damaged ({_first_sentence(e)}); write it again.') from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise UserError(f'npz file {path} is damaged or truncated ({_first_sentence(e)}); '
                    'write it again.') from None
  num_classes = int(max(int(y.max()) for y in all_labels if y.size)) + 1
  return images, labels.astype(np.int32), num_classes


def _first_sentence(error: BaseException) -> str:
  return str(error).strip().splitlines()[0].rstrip('.') if str(error).strip() else type(
      error).__name__


def _fake_arrays(name: str, data_config: ml_collections.ConfigDict
                 ) -> tuple[np.ndarray, np.ndarray, int]:
  """Synthetic images: a smooth colour pattern per class, shifted, plus noise.

  The class prototypes come from a fixed seed, so train and test share them;
  each split draws its own examples. A linear probe on raw pixels separates the
  classes well, which makes learning visible in seconds.
  """
  sizes = {'train': data_config.fake_train_size, 'test': data_config.fake_test_size}
  if name not in sizes:
    raise UserError(f"the fake source has splits 'train' and 'test', not {name!r}.")
  num_classes, n = data_config.fake_num_classes, sizes[name]
  proto_rng = np.random.default_rng(1234)
  coarse = proto_rng.uniform(-1, 1, size=(num_classes, 4, 4, 3))
  protos = coarse.repeat(8, axis=1).repeat(8, axis=2)  # [C, 32, 32, 3] blocky patterns
  rng = np.random.default_rng({'train': 1, 'test': 2}[name])
  labels = rng.integers(0, num_classes, size=n)
  shifts = rng.integers(-2, 3, size=(n, 2))
  images = np.stack([np.roll(protos[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts)])
  images = images * 0.6 + rng.normal(0.0, 0.25, size=images.shape)
  images = np.clip((images + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return images, labels.astype(np.int32), num_classes


def _check_network(builder: Any) -> None:
  """Fails fast when the download hosts are unreachable (TFDS retries for minutes)."""
  hosts = {urllib.parse.urlsplit(url).hostname for url in (builder.url_infos or {})}
  for host in sorted(h for h in hosts if h):
    try:
      socket.create_connection((host, 443), timeout=_NETWORK_TIMEOUT_S).close()
    except OSError:
      raise UserError(
          f'cannot reach {host} to download {builder.name}; on a machine with '
          f'network run `tfds build {builder.name} --data_dir DIR` and copy DIR '
          f'here (data.data_dir=DIR or $TFDS_DATA_DIR), or use data.source=npz:PATH.'
      ) from None


def _load_tfds(name: str, split: str, data_config: ml_collections.ConfigDict) -> Split:
  import tensorflow_datasets as tfds  # Heavy; only the tfds source needs it.

  try:
    builder = tfds.builder(name, data_dir=data_config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
        f'TFDS has no data set named {name!r}; check data.source=tfds:<name>.') from None
  if not builder.is_prepared():
    if not data_config.download:
      raise UserError(
          f'{name} is not prepared in {builder.data_dir}; set data.download=True, '
          f'or point data.data_dir (or $TFDS_DATA_DIR) at a prepared copy.')
    _check_network(builder)
    builder.download_and_prepare()
  known = list(builder.info.splits.keys())
  if known and parse_split(split)[0] not in known:
    raise UserError(f'{name} has no split {split!r}; it has: {sorted(known)}.')
  try:
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  except (ValueError, KeyError) as e:
    raise UserError(f'{name} has no split {split!r} ({e}).') from None
  images, labels = [], []
  for x, y in tfds.as_numpy(ds.batch(8192)):
    images.append(x)
    labels.append(y)
  images = np.concatenate(images) if images else np.zeros((0, *IMAGE_SHAPE), np.uint8)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  _check_arrays(images, labels, f'TFDS data set {name!r}')
  label_feature = builder.info.features[builder.info.supervised_keys[1]]
  return Split(images, labels.astype(np.int32), int(label_feature.num_classes))


def load_split(data_config: ml_collections.ConfigDict, split: str) -> Split:
  """Loads one split of the configured source into host memory.

  Args:
    data_config: the config's ``data`` block (``source``, ``data_dir``, ...).
    split: a TFDS-style split string, e.g. ``'train[:45000]'``.

  Returns:
    A :class:`Split` of uint8 ``[N, 32, 32, 3]`` images and int32 labels.

  Raises:
    UserError: unknown source, missing file, wrong arrays, unknown split, data
      not prepared while ``download`` is off, or no network to download it.
  """
  source = data_config.source
  kind, _, arg = source.partition(':')
  if kind == 'tfds' and arg:
    result = _load_tfds(arg, split, data_config)
    if not len(result):
      raise UserError(f'split {split!r} of {source} is empty.')
    return result
  name, sl, percent = parse_split(split)
  if kind == 'npz' and arg:
    images, labels, num_classes = _load_npz(arg, name)
  elif source == 'fake':
    images, labels, num_classes = _fake_arrays(name, data_config)
  else:
    raise UserError(f'unknown data source {source!r}; use tfds:<name>, npz:<path> or fake.')
  rows = _apply_slice(len(labels), sl, percent)
  if rows.stop <= rows.start:
    raise UserError(f'split {split!r} of {source} is empty ({len(labels)} examples in {name!r}).')
  return Split(images[rows], labels[rows], num_classes)


# --------------------------------------------------------------------------
# On the device.


@flax.struct.dataclass
class DeviceSplit:
  """A split copied once to every device: uint8 images and int32 labels.

  A pytree, so jitted functions take it as an argument (never as a constant
  baked into the program).
  """
  images: jax.Array
  labels: jax.Array
  num_classes: int = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, split: Split, mesh: jax.sharding.Mesh) -> DeviceSplit:
    images, labels = sharding.put_replicated((split.images, split.labels), mesh)
    return cls(images, labels, split.num_classes)

  def __len__(self) -> int:
    return self.labels.shape[0]


def epoch_permutation(seed: int, epoch: jax.Array | int, num_examples: int) -> jax.Array:
  """The order of the training examples in ``epoch``: int32 ``[num_examples]``.

  Depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
  """
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch; the last partial training batch is dropped."""
  return num_examples // batch_size


def train_batch(data: DeviceSplit, perm: jax.Array, step_in_epoch: jax.Array,
                batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Gathers training batch ``step_in_epoch`` of an epoch (call inside jit).

  Returns:
    uint8 images ``[B, 32, 32, 3]`` and int32 labels ``[B]``.
  """
  idx = jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * batch_size, batch_size)
  return data.images[idx], data.labels[idx]


def eval_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Padded index batches that visit every example exactly once.

  Returns:
    ``idx`` int32 ``[num_batches, B]`` (padding repeats the last example) and
    ``valid`` bool ``[num_batches, B]``, False on the padding.
  """
  num_batches = -(-num_examples // batch_size)
  flat = np.arange(num_batches * batch_size)
  valid = flat < num_examples
  idx = np.minimum(flat, num_examples - 1).astype(np.int32)
  return idx.reshape(num_batches, batch_size), valid.reshape(num_batches, batch_size)


def to_float(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 ``[..., 32, 32, 3]`` -> ``dtype`` in [-1, 1] (mean 0.5, std 0.5 as the study)."""
  return images.astype(dtype) / 127.5 - 1.0


def augment(rng: jax.Array, images: jax.Array, *, crop_padding: int = 4,
            flip: bool = True) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per image.

  Args:
    rng: a PRNG key.
    images: ``[B, H, W, C]`` of any dtype.
    crop_padding: pixels of padding on each side before the crop (0: no crop).
    flip: whether to flip each image left-right with probability 1/2.

  Returns:
    ``[B, H, W, C]``, same dtype.
  """
  b, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * p + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_rng, 0.5, (b, 1, 1, 1))
    images = jnp.where(flips, images[:, :, ::-1], images)
  return images


def prepare_batch(rng: jax.Array, images: jax.Array, *, augment_images: bool,
                  dtype: Any = jnp.float32) -> jax.Array:
  """uint8 batch -> float images in [-1, 1], augmented when asked (inside jit)."""
  if augment_images:
    images = augment(rng, images)
  return to_float(images, dtype)
