r"""The reference study's PyTorch training steps, timed like ``mil_jax.bench``.

An optional comparison tool, not part of mil_jax: it needs PyTorch
(``pip install torch``; mil_jax does not depend on it). It rebuilds the three
models of the reference study as described in ``reference/SEED.md`` (FC;
Conv k4 s2 p1 + LeakyReLU + LayerNorm over channels; MAE with HF-ViT-like
blocks: width 192, 6 encoder / 2 decoder blocks, 3 heads, MLP 768, patch 2,
mask ratio 0.75) and times one full training step each: gather a batch of
uint8 images from memory by a random permutation, convert to [-1, 1],
forward, loss, backward, Adam(W) update, with PyTorch's default (per-tensor)
Adam as the reference used it.

  python benchmarks/torch_reference.py --model conv:192 --batch 32
  python benchmarks/torch_reference.py --all --threads 2

Each configuration prints one JSON line with ``images_per_s`` (median of the
timed windows), ``step_ms`` and ``params``, like ``python -m mil_jax.bench``.
On a shared machine run the two alternately and compare medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

REFERENCE_SET = (('fc', 128), ('conv:192', 32), ('conv:192', 128), ('conv:256', 32),
                 ('mae:seed', 128))


class FCAutoencoder(nn.Module):
  """3072 -> 1536 -> 768 -> 384 and back, as the reference."""

  def __init__(self):
    super().__init__()
    dims = [3072, 1536, 768, 384]
    enc, dec = [], []
    for a, b in zip(dims[:-1], dims[1:]):
      enc += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    for a, b in zip(dims[::-1][:-1], dims[::-1][1:]):
      dec += [nn.ReLU(), nn.Linear(a, b)]
    self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec, nn.Tanh())

  def forward(self, x):
    return self.decoder(self.encoder(x.flatten(1))).view_as(x)


class ChannelLayerNorm(nn.LayerNorm):
  """LayerNorm over the channels of an NCHW map."""

  def forward(self, x):
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvAutoencoder(nn.Module):
  """4 stride-2 convs per half, channels c, 2c, 4c, 8c (c = 6: Conv-192, 8: Conv-256)."""

  def __init__(self, c: int):
    super().__init__()
    ch = [c * 2 ** i for i in range(4)]
    enc = [nn.Conv2d(3, ch[0], 4, 2, 1), nn.LeakyReLU(0.2)]
    for a, b in zip(ch[:-1], ch[1:]):
      enc += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2), ChannelLayerNorm(b)]
    dec = []
    for a, b in zip(ch[::-1][:-1], ch[::-1][1:]):
      dec += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU(), ChannelLayerNorm(b)]
    dec += [nn.ConvTranspose2d(ch[0], 3, 4, 2, 1), nn.Tanh()]
    self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    return self.decoder(self.encoder(x))


class ViTLayer(nn.Module):
  """A HF-ViT-like pre-LN block: separate query/key/value projections."""

  def __init__(self, d=192, heads=3, mlp=768):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
    self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
    self.out = nn.Linear(d, d)
    self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

  def forward(self, x):
    b, t, d = x.shape
    y = self.norm1(x)
    split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
    q, k, v = split(self.query(y)), split(self.key(y)), split(self.value(y))
    att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
    x = x + self.out((att @ v).transpose(1, 2).reshape(b, t, d))
    return x + self.mlp(self.norm2(x))


class MAE(nn.Module):
  """Patch 2, width 192, 6 + 2 blocks, mask 0.75, loss over removed patches."""

  def __init__(self, d=192, enc_depth=6, dec_depth=2, patch=2, mask_ratio=0.75):
    super().__init__()
    self.p, self.n, self.ratio = patch, (32 // patch) ** 2, mask_ratio
    self.embed = nn.Conv2d(3, d, patch, patch)
    self.cls = nn.Parameter(torch.zeros(1, 1, d))
    self.pos = nn.Parameter(torch.randn(1, self.n + 1, d) * 0.02)
    self.encoder = nn.Sequential(*[ViTLayer(d) for _ in range(enc_depth)])
    self.enc_norm = nn.LayerNorm(d, eps=1e-12)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
    self.dec_pos = nn.Parameter(torch.randn(1, self.n + 1, d) * 0.02)
    self.decoder = nn.Sequential(*[ViTLayer(d) for _ in range(dec_depth)])
    self.pred = nn.Linear(d, patch * patch * 3)

  def patchify(self, x):
    b, c, h, w = x.shape
    p = self.p
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, self.n, p * p * c)

  def forward(self, x):
    b = x.shape[0]
    tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos[:, 1:]
    keep = int(self.n * (1 - self.ratio))
    ids_shuffle = torch.argsort(torch.rand(b, self.n), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, tokens.shape[2]))
    cls = (self.cls + self.pos[:, :1]).expand(b, -1, -1)
    z = self.enc_norm(self.encoder(torch.cat([cls, visible], 1)))
    masks = self.mask_token.expand(b, self.n - keep, -1)
    z_patches = torch.cat([z[:, 1:], masks], 1)
    z_patches = torch.gather(z_patches, 1, ids_restore[..., None].expand(-1, -1, z.shape[2]))
    y = self.decoder(torch.cat([z[:, :1], z_patches], 1) + self.dec_pos)
    pred = self.pred(y[:, 1:])
    mask = torch.ones(b, self.n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    per_patch = ((pred - self.patchify(x)) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def build(spec: str):
  """(model, optimizer, loss(model, x)) for 'fc' | 'conv:192' | 'conv:256' | 'mae:seed'."""
  name, _, variant = spec.partition(':')
  if name == 'fc':
    model = FCAutoencoder()
    return model, torch.optim.Adam(model.parameters(), 1e-4), lambda x: ((model(x) - x) ** 2).mean()
  if name == 'conv':
    model = ConvAutoencoder(8 if variant == '256' else 6)
    return model, torch.optim.Adam(model.parameters(), 1e-4), lambda x: ((model(x) - x) ** 2).mean()
  if name == 'mae':
    model = MAE()
    opt = torch.optim.AdamW(model.parameters(), 2e-4, weight_decay=0.05)
    return model, opt, model
  raise SystemExit(f'unknown model {spec!r}')


def bench_one(spec: str, batch: int, seconds: float, windows: int) -> dict:
  """Times the full training step of ``spec`` at ``batch``."""
  torch.manual_seed(0)
  model, opt, loss_fn = build(spec)
  data = torch.randint(0, 256, (max(2048, 8 * batch), 3, 32, 32), dtype=torch.uint8)
  perm, pos = torch.randperm(len(data)), 0

  def step():
    nonlocal perm, pos
    if pos + batch > len(data):
      perm, pos = torch.randperm(len(data)), 0
    x = data[perm[pos:pos + batch]].float() / 127.5 - 1.0
    pos += batch
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(x)
    loss.backward()
    opt.step()
    return loss

  t0, calls = time.perf_counter(), 0
  while calls < 3 or (time.perf_counter() - t0 < 0.5 and calls < 50):
    step()
    calls += 1
  per_step = (time.perf_counter() - t0) / calls
  steps = max(1, int(round(seconds / per_step)))
  rates = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = step()
    float(loss.detach())
    rates.append(steps * batch / (time.perf_counter() - t0))
  rate = statistics.median(rates)
  return {'impl': 'torch', 'model': spec, 'stage': 'pretrain', 'batch': batch,
          'images_per_s': round(rate, 1), 'images_per_s_windows': [round(r, 1) for r in rates],
          'step_ms': round(1e3 * batch / rate, 3),
          'params': sum(p.numel() for p in model.parameters()),
          'torch': torch.__version__, 'threads': torch.get_num_threads()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='conv:192')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--all', action='store_true', help='the reference set of mil_jax.bench')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--seconds', type=float, default=3.0)
  parser.add_argument('--windows', type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  runs = REFERENCE_SET if args.all else ((args.model, args.batch),)
  for spec, batch in runs:
    print(json.dumps(bench_one(spec, batch, args.seconds, args.windows)), flush=True)


if __name__ == '__main__':
  main()
