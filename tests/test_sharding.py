"""Tests of mil_jax.sharding on 1 and on 8 simulated CPU devices."""
import textwrap

import jax
import pytest

from mil_jax import sharding
from mil_jax.errors import UserError

from .conftest import run_command


def run_on_eight_devices(script):
  """Runs ``script`` in a process with 8 simulated CPU devices; it must print 'ok' last."""
  result = run_command(['-c', script],
                       env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                            'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok')


def test_check_batch_size():
  mesh = sharding.make_mesh(jax.devices()[:1])
  sharding.check_batch_size(3, mesh)
  with pytest.raises(UserError, match='at least 1'):
    sharding.check_batch_size(0, mesh)


def test_eight_devices_shard_the_batch():
  script = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from configs import common
      from mil_jax import input_pipeline as ip, sharding
      from mil_jax.errors import UserError
      mesh = sharding.make_mesh()
      assert mesh.size == 8, mesh
      try:
        sharding.check_batch_size(12, mesh)
        raise SystemExit('12 over 8 devices was accepted')
      except UserError as e:
        assert 'multiple of 8' in str(e), e
      cfg = common.data_config(); cfg.source = 'fake'
      data = ip.DeviceSplit.create(ip.load_split(cfg, 'train'), mesh)
      assert data.images.sharding.is_fully_replicated
      perm = ip.epoch_permutation(0, 0, len(data))
      @jax.jit
      def batch(perm):
        images, labels = ip.train_batch(data, perm, 1, 32)
        return jax.lax.with_sharding_constraint(images, sharding.batch_sharded(mesh))
      out = batch(perm)
      shards = out.addressable_shards
      assert len(shards) == 8 and all(s.data.shape == (4, 32, 32, 3) for s in shards)
      idx = np.asarray(perm[32:64])
      np.testing.assert_array_equal(np.asarray(out), np.asarray(data.images)[idx])
      print('ok')
  ''')
  run_on_eight_devices(script)


def test_training_mesh_takes_the_devices_the_settings_say():
  script = textwrap.dedent('''
      import jax
      from mil_jax import sharding
      assert sharding.training_mesh().size == 8
      mesh = sharding.training_mesh(3)
      assert mesh.size == 3 and list(mesh.devices.flat) == jax.devices()[:3]
      print('ok')
  ''')
  run_on_eight_devices(script)
