"""Tests of mil_jax.optim: the reference schedules advance, freezing is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import conv as conv_config
from configs import fc as fc_config
from configs import mae as mae_config
from mil_jax import optim

SPE = 391  # CIFAR train at batch 128


def schedule_of(module, variant, steps_per_epoch):
  config = module.get_config(variant)
  return optim.make_schedule(config.optim, steps_per_epoch=steps_per_epoch,
                             total_steps=steps_per_epoch * config.num_epochs)


@pytest.mark.parametrize('module,variant,spe,expected', [
    # FC: Adam 1e-4, x0.9 after every epoch.
    (fc_config, 'l2', SPE, {0: 1e-4, SPE - 1: 1e-4, SPE: 9e-5, 10 * SPE: 1e-4 * 0.9 ** 10}),
    # Conv: cosine with T_max 1562 steps, rising again after it (PyTorch's form).
    (conv_config, '192', 1562, {0: 1e-4, 781: 5e-5, 1562: 0.0, 2343: 5e-5, 3124: 1e-4}),
    # MAE: warmup 200 epochs to 2e-4, cosine to 0 at epoch 2000.
    (mae_config, 'seed', SPE, {0: 0.0, 100 * SPE: 1e-4, 200 * SPE: 2e-4,
                               1100 * SPE: 1e-4, 2000 * SPE: 0.0}),
])
def test_reference_schedules(module, variant, spe, expected):
  schedule = schedule_of(module, variant, spe)
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-4, abs=1e-10), step


def _params():
  return {'encoder': {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}},
          'head': {'kernel': jnp.ones((2, 4)), 'bias': jnp.zeros((4,))}}


def test_partition_labels_and_errors():
  labels = optim.partition_labels(_params(), [('encoder/.*', 'freeze'), ('.*', 'train')])
  assert labels['encoder']['dense']['kernel'] == 'freeze'
  assert labels['head']['bias'] == 'train'
  with pytest.raises(ValueError, match='match no parameter'):
    optim.partition_labels(_params(), [('encoderr/.*', 'freeze'), ('.*', 'train')])
  with pytest.raises(ValueError, match='matched by no rule'):
    optim.partition_labels(_params(), [('encoder/.*', 'freeze')])


def test_frozen_leaves_get_no_update_no_state_no_decay():
  config = mae_config.get_config('seed').optim  # adamw with weight decay
  params = _params()
  tx, _ = optim.make_optimizer(config, params, steps_per_epoch=10, total_steps=100,
                               freeze=('encoder/.*',))
  state = tx.init(params)
  # Optimizer state holds arrays for the head only.
  sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, 'size') and x.ndim > 0)
  head_size = 2 * 4 + 4
  assert sizes == 2 * head_size  # Adam's two moments of the head
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['encoder']['dense']['kernel'], np.ones((3, 2)))
  np.testing.assert_array_equal(params['encoder']['dense']['bias'], np.ones((2,)))
  assert (np.asarray(params['head']['kernel']) < 1.0).all()


def test_weight_decay_skips_biases():
  config = mae_config.get_config('seed').optim
  config.schedule, config.lr = 'constant', 0.1
  params = _params()
  tx, _ = optim.make_optimizer(config, params, steps_per_epoch=1, total_steps=1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates['head']['kernel']).sum()) > 0  # decayed
  assert float(jnp.abs(updates['encoder']['dense']['bias']).sum()) == 0  # not decayed


@pytest.mark.parametrize('block', [2, optim.CPU_NORM_BLOCK])
def test_global_norm_matches_optax(block):
  # Sizes that are and are not multiples of the block, several levels deep,
  # a scalar and a bfloat16 leaf.
  rng = np.random.default_rng(0)
  tree = {'w': jnp.asarray(rng.normal(size=(96, 70)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(33,)), jnp.float32),
          's': jnp.float32(-3.0),
          'h': jnp.asarray(rng.normal(size=(5, 7)), jnp.bfloat16)}
  want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree.values()))
  got = jax.jit(lambda t: optim.global_norm(t, block=block))(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got, optax.global_norm(tree), rtol=1e-5)
