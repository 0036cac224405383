"""The run's pictures: loss curves, reconstructions, accuracy curves (PNG)."""
from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def _figure(**kwargs: Any) -> Any:
  """A ``matplotlib.figure.Figure``, drawn by the Agg canvas when saved: files
  only, no window, and no pyplot state to change for the caller. matplotlib
  is imported here, at the first picture, not when a command starts: one that
  stops before drawing (a user's mistake, a kNN run) starts faster."""
  from matplotlib.figure import Figure  # noqa: PLC0415
  return Figure(**kwargs)


def to_draw(path: pathlib.Path, trained: bool) -> bool:
  """Whether a run's picture ``path`` is drawn: after training, or where it is missing."""
  return trained or not path.exists()


def _per_epoch(records: Sequence[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
  """(epochs, values) of ``name``, the last record of each epoch."""
  by_epoch: dict[float, float] = {}
  for r in records:
    if name in r and r[name] is not None:
      by_epoch[r['epoch']] = r[name]
  epochs = sorted(by_epoch)
  return epochs, [by_epoch[e] for e in epochs]


def plot_curves(records: Sequence[dict[str, Any]], path: str | pathlib.Path, *,
                panels: Sequence[tuple[str, Sequence[str], bool]]) -> None:
  """One panel per ``(title, metric names, log scale)``, metric vs epoch."""
  fig = _figure(figsize=(5.5 * len(panels), 4))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (title, names, log) in zip(axes[0], panels):
    for name in names:
      epochs, values = _per_epoch(records, name)
      if epochs:
        ax.plot(epochs, values, marker='.', label=name)
    if log:
      ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_loss(records: Sequence[dict[str, Any]], path: str | pathlib.Path) -> None:
  """Train and validation loss per epoch, log scale (as the study plotted)."""
  plot_curves(records, path, panels=[('loss', ['train/loss', 'eval/loss'], True)])


def plot_accuracy(records: Sequence[dict[str, Any]], path: str | pathlib.Path) -> None:
  """Validation loss and accuracy per epoch."""
  plot_curves(records, path, panels=[('loss', ['train/loss', 'eval/loss'], False),
                                     ('accuracy', ['eval/accuracy', 'eval/top5'], False)])


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] -> uint8."""
  return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def plot_image_rows(rows: Sequence[tuple[str, np.ndarray]], path: str | pathlib.Path) -> None:
  """A grid: one row per ``(label, images [K, H, W, 3] in [-1, 1])``."""
  k = len(rows[0][1])
  fig = _figure(figsize=(k * 1.1, len(rows) * 1.2))
  axes = fig.subplots(len(rows), k, squeeze=False)
  for r, (label, images) in enumerate(rows):
    for c in range(k):
      ax = axes[r][c]
      ax.imshow(to_uint8(images[c]), interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r][0].set_ylabel(label, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_study(groups: Sequence[str], bars: dict[str, Sequence[float | None]],
               references: dict[str, Sequence[float | None]],
               strips: Sequence[tuple[str, np.ndarray]], path: str | pathlib.Path) -> None:
  """The study's picture: accuracy bars per protocol and encoder over reconstruction strips.

  Args:
    groups: protocol names, one group of bars each.
    bars: encoder name -> accuracy per group (None: no number; no bar).
    references: encoder name -> the reference's accuracy per group (None: none),
      drawn as a black tick over the bar.
    strips: ``(label, images [K, H, W, 3] in [-1, 1])``, e.g. the originals
      then one reconstruction per encoder; drawn as one row of images each.
    path: the PNG to write.
  """
  names = list(bars)
  n_strips = len(strips)
  fig = _figure(figsize=(max(8.0, 1.6 * len(groups) + 2), 4.2 + 0.75 * n_strips))
  grid = fig.add_gridspec(1 + n_strips, 1, height_ratios=[4.0] + [0.75] * n_strips)
  ax = fig.add_subplot(grid[0])
  width = 0.8 / max(len(names), 1)
  x = np.arange(len(groups))
  for i, name in enumerate(names):
    offset = x + (i - (len(names) - 1) / 2) * width
    values = [np.nan if v is None else v for v in bars[name]]
    ax.bar(offset, values, width, label=name)
    refs = [np.nan if r is None else r for r in references.get(name, [None] * len(groups))]
    ax.scatter(offset, refs, marker='_', s=160, color='black', zorder=3,
               label='reference' if i == 0 else None)
  ax.set_xticks(x, groups)
  ax.set_ylabel('top-1 accuracy')
  ax.set_ylim(bottom=0)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8, ncol=min(len(names) + 1, 6))
  ax.set_title('accuracy per protocol and encoder')
  for r, (label, images) in enumerate(strips):
    # One axis per strip: the images side by side, so rows stay aligned whatever K is.
    row = np.concatenate(list(to_uint8(images)), axis=1)
    strip_ax = fig.add_subplot(grid[1 + r])
    strip_ax.imshow(row, interpolation='nearest')
    strip_ax.set_xticks([])
    strip_ax.set_yticks([])
    strip_ax.set_ylabel(label, rotation=0, ha='right', va='center', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_sweep(points: Sequence[dict[str, Any]], path: str | pathlib.Path) -> None:
  """Parameters and latent size (x, log scale) against kNN accuracy and PSNR (y), per point.

  Args:
    points: records with 'label', 'params', 'latent_dim', 'knn_accuracy'
      and 'psnr' (None: not measured; no marker).
    path: the PNG to write.
  """
  import matplotlib.ticker  # noqa: PLC0415
  panels = [('params', 'parameters'), ('latent_dim', 'latent size')]
  scores = [('knn_accuracy', 'kNN accuracy'), ('psnr', 'PSNR (dB)')]
  fig = _figure(figsize=(10, 7.5))
  axes = fig.subplots(len(scores), len(panels), squeeze=False)
  for r, (score, score_label) in enumerate(scores):
    for c, (size, size_label) in enumerate(panels):
      ax = axes[r][c]
      for p in points:
        if p[score] is None:
          continue
        ax.scatter(p[size], p[score], s=30)
        ax.annotate(p['label'], (p[size], p[score]), fontsize=7, xytext=(4, 3),
                    textcoords='offset points')
      ax.set_xscale('log')
      # Round numbers with separators; log axes' default minor labels overlap.
      ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
      ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter('{x:,.0f}'))
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.set_xlabel(size_label)
      ax.set_ylabel(score_label)
      ax.grid(alpha=0.3)
  fig.suptitle('sweep: size against kNN accuracy and reconstruction')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
