"""Checkpoints: round trip, pruning, damaged and incompatible checkpoints, SIGKILL during a save, resharding."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxnas import checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(seed=0):
  rng = np.random.default_rng(seed)
  params = {'cell': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
            'head': {'bias': jnp.asarray(rng.normal(size=(10,)), jnp.bfloat16)}}
  opt = optax.chain(optax.clip_by_global_norm(5.0), optax.sgd(0.1, momentum=0.9))
  opt_state = opt.init(params)
  opt_state = jax.tree.map(lambda x: x + 1.5 if isinstance(x, jax.Array) else x, opt_state)
  return {'params': params, 'opt': opt_state, 'alphas': {'normal': jnp.asarray(rng.normal(size=(14, 8)))},
          'rng': jax.random.key(seed + 11), 'raw_rng': jax.random.PRNGKey(seed + 12), 'step': 17 + seed,
          'position': (3, np.int64(5)), 'lr': 0.025, 'host': rng.normal(size=(4,))}


def _zeros_like(state):
  """A target of the same structure with different values (a fresh state, as at start-up)."""
  target = jax.tree.map(lambda x: x * 0 if isinstance(x, (jax.Array, np.ndarray)) and not
                        jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)
  return {**target, 'rng': jax.random.key(0), 'step': 0, 'position': (0, np.int64(0)), 'lr': 0.0}


def _assert_same(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert type(a) is type(b)
    if isinstance(b, jax.Array) and jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
      assert a.dtype == b.dtype
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_round_trip(tmp_path):
  state = _state()
  assert checkpoint.latest_step(tmp_path / 'none') is None
  assert checkpoint.save_checkpoint(tmp_path, 17, state)
  assert checkpoint.latest_step(tmp_path) == 17
  restored = checkpoint.restore_checkpoint(tmp_path, _zeros_like(state))
  _assert_same(restored, state)
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.normal(restored['rng'], (3,)), jax.random.normal(state['rng'], (3,)))


def test_existing_step_is_not_overwritten(tmp_path):
  checkpoint.save_checkpoint(tmp_path, 1, {'x': jnp.ones(3)})
  assert not checkpoint.save_checkpoint(tmp_path, 1, {'x': jnp.zeros(3)})
  np.testing.assert_array_equal(checkpoint.restore_checkpoint(tmp_path, {'x': jnp.zeros(3)})['x'], np.ones(3))


def test_keep_prunes_old_steps(tmp_path):
  for step in range(1, 6):
    checkpoint.save_checkpoint(tmp_path, step, {'x': jnp.full((2,), step)}, keep=2)
  assert checkpoint.all_steps(tmp_path) == [4, 5]
  assert checkpoint.latest_step(tmp_path) == 5
  np.testing.assert_array_equal(checkpoint.restore_checkpoint(tmp_path, {'x': jnp.zeros(2, jnp.int32)},
                                                              step=4)['x'], [4, 4])
  with pytest.raises(FileNotFoundError, match=r'no checkpoint step 1 in .*available steps: \[4, 5\]'):
    checkpoint.restore_checkpoint(tmp_path, {'x': jnp.zeros(2, jnp.int32)}, step=1)


def test_no_checkpoint_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    checkpoint.restore_checkpoint(tmp_path, {'x': jnp.zeros(2)})


@pytest.mark.parametrize('target, match', [
    ({'x': jnp.zeros(4), 'y': jnp.zeros(1)}, r"does not match the state \(missing \['y'\], unexpected \[\]\)"),
    ({'z': jnp.zeros(4)}, r"missing \['z'\], unexpected \['x'\]"),
    ({'x': jnp.zeros(5)}, r'stores x with shape \(4,\), the state has \(5,\)'),
    ({'x': np.zeros((2, 2))}, r'stores x with shape \(4,\), the state has \(2, 2\)'),
])
def test_incompatible_checkpoint_error(tmp_path, target, match):
  checkpoint.save_checkpoint(tmp_path, 3, {'x': jnp.arange(4.0)})
  with pytest.raises(ValueError, match=match + r'.*use a new workdir or delete that checkpoint directory'):
    checkpoint.restore_checkpoint(tmp_path, target)


def _files(directory):
  return [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files]


@pytest.mark.parametrize('damage', ['truncate_largest', 'truncate_all', 'garble_all', 'flip_bits'])
def test_damaged_checkpoint_error(tmp_path, damage):
  """``flip_bits``: 64 bytes inside the stored array change in place (files and sizes intact, the array's bytes
  are stored uncompressed): only the stored checksums can tell."""
  state = {'w': jnp.asarray(np.random.default_rng(0).standard_normal(50_000), jnp.float32), 'step': 2}
  checkpoint.save_checkpoint(tmp_path, 1, {'w': jnp.ones(50_000), 'step': 1})
  checkpoint.save_checkpoint(tmp_path, 2, state)
  files = _files(tmp_path / '2')
  if damage in ('truncate_largest', 'flip_bits'):
    files = [max(files, key=os.path.getsize)]
  for path in files:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      if damage == 'garble_all':
        f.seek(size // 2)
        f.write(b'\xff' * max(1, size - size // 2))
      elif damage == 'flip_bits':
        f.seek(size // 2)
        flipped = bytes(b ^ 0x10 for b in f.read(64))
        f.seek(size // 2)
        f.write(flipped)
      else:
        f.truncate(size // 2)
  with pytest.raises(ValueError, match=r'checkpoint .*2 is damaged and cannot be restored .*delete that '
                                       r'step directory to resume from the previous checkpoint, '
                                       r'or use another workdir') as error:
    checkpoint.restore_checkpoint(tmp_path, {'w': jnp.zeros(50_000), 'step': 0})
  if damage == 'flip_bits':
    assert 'w differs from the array that was saved (CRC-32 mismatch)' in str(error.value)
  previous = checkpoint.restore_checkpoint(tmp_path, {'w': jnp.zeros(50_000), 'step': 0}, step=1)
  assert previous['step'] == 1 and float(previous['w'].sum()) == 50_000


def test_checkpoints_without_checksums_still_restore(tmp_path):
  """Checkpoints written before the checksums were stored (a plain orbax item) restore unchecked."""
  with checkpoint._manager(str(tmp_path), create=True) as manager:
    manager.save(4, args=ocp.args.StandardSave({'w': np.arange(3.0), 'step': np.asarray(4)}))
    manager.wait_until_finished()
  restored = checkpoint.restore_checkpoint(tmp_path, {'w': np.zeros(3), 'step': 0})
  assert restored['step'] == 4 and restored['w'].tolist() == [0.0, 1.0, 2.0]


def _python(code, *args, **kwargs):
  env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}
  return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code), *map(str, args)], cwd=REPO_ROOT,
                          env=env, **kwargs)


def test_sigkill_during_save_keeps_a_valid_latest_checkpoint(tmp_path):
  """A writer saves 16 MB states in a loop; it is killed with SIGKILL while a save is in its temporary dir."""
  writer = """
      import sys
      import jax.numpy as jnp
      from jaxnas import checkpoint
      directory, first = sys.argv[1], int(sys.argv[2])
      for step in range(first, first + 1000):
        checkpoint.save_checkpoint(directory, step, {'w': jnp.full((4_000_000,), step, jnp.float32),
                                                     'step': step}, keep=2)
  """
  directory = tmp_path / 'ckpt'
  target = {'w': jnp.zeros((4_000_000,), jnp.float32), 'step': 0}
  # Finished steps, read from the directory names: the writer deletes old steps while this polls.
  last_finished = lambda: max([int(n) for n in os.listdir(directory) if n.isdigit()] or [0])
  for delay in [0.0, 0.01]:  # Kill as soon as a save starts, and some way into it.
    # A save takes ~50 ms: a kill can land just after one ends; such a try is repeated.
    for _ in range(10):
      before = last_finished() if directory.is_dir() else 0
      proc = _python(writer, directory, before + 1, stderr=subprocess.DEVNULL)
      killed_mid_save = False
      deadline = time.time() + 60
      while not killed_mid_save and time.time() < deadline and proc.poll() is None:
        in_progress = directory.is_dir() and any('tmp' in name for name in os.listdir(directory))
        # Wait for one finished step of this writer, then for a save in progress.
        if in_progress and last_finished() > before:
          time.sleep(delay)
          proc.send_signal(signal.SIGKILL)
          killed_mid_save = True
        time.sleep(0.002)
      proc.kill()
      proc.wait()
      assert killed_mid_save, f'the writer (delay {delay}) was not caught during a save'
      step = checkpoint.latest_step(directory)
      if (directory / f'{step + 1}.orbax-checkpoint-tmp').exists():  # the save after `step` was cut short
        break
    else:
      raise AssertionError(f'no kill (delay {delay}) landed inside a save in 10 tries')
    assert step > before
    restored = checkpoint.restore_checkpoint(directory, target)
    assert restored['step'] == step
    np.testing.assert_array_equal(np.asarray(restored['w'][::100_000]), np.full(40, step, np.float32))


def test_restore_across_device_counts(tmp_path):
  """Step 1 is written on 1 device and restored sharded over 4 (in a subprocess); step 2 the other way round."""
  values = np.arange(32.0, dtype=np.float32).reshape(8, 4)
  checkpoint.save_checkpoint(tmp_path, 1, {'w': jnp.asarray(values), 'step': 1})
  four_devices = """
      import sys
      import jax
      jax.config.update('jax_num_cpu_devices', 4)
      import jax.numpy as jnp
      import numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from jaxnas import checkpoint
      directory = sys.argv[1]
      sharding = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data'))
      target = {'w': jax.device_put(jnp.zeros((8, 4)), sharding), 'step': 0}
      restored = checkpoint.restore_checkpoint(directory, target, step=1)
      assert restored['w'].sharding == sharding and len(restored['w'].addressable_shards) == 4
      np.testing.assert_array_equal(restored['w'], np.arange(32.0).reshape(8, 4))
      checkpoint.save_checkpoint(directory, 2, {'w': restored['w'] * 2, 'step': 2})
  """
  proc = _python(four_devices, tmp_path, stderr=subprocess.PIPE)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr.decode()[-2000:]
  restored = checkpoint.restore_checkpoint(tmp_path, {'w': jnp.zeros((8, 4)), 'step': 0})
  assert restored['step'] == 2 and len(restored['w'].devices()) == 1
  np.testing.assert_array_equal(restored['w'], 2 * values)
  on_host = checkpoint.restore_checkpoint(tmp_path, {'w': np.zeros((8, 4), np.float32), 'step': 0})
  assert isinstance(on_host['w'], np.ndarray)
  np.testing.assert_array_equal(on_host['w'], 2 * values)
