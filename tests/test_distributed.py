"""Data-parallel search through the real entry point: 8 devices == 1 device, 2 processes == 1 process.

Each run is ``python -m jaxnas.main`` in a subprocess, because the number of host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``) and JAX's distributed runtime are fixed when JAX
starts. The two-process run uses JAX's distributed runtime on localhost with CPU (gloo) collectives, which is
the code path of a multi-host TPU pod or GPU cluster: per-process input slices, global arrays, shared
checkpoints.
"""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PRIMITIVES = ('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
# A tiny search on 8x8 digits: 32 examples = 16 train + 16 val, global batch 8 (1 per device on 8), 2 epochs.
TINY = [f'--config={REPO_ROOT / "configs" / "darts.py"}:smoke', '--config.model.init_channels=2',
        '--config.model.layers=3', f'--config.model.primitives={PRIMITIVES}', '--config.data.num_examples=32',
        '--config.search.batch_size=8', '--config.search.epochs=2', '--config.arch.lr=0.01']


def _env(devices: int = 1, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             **extra)
  env.pop('JAX_ENABLE_X64', None)
  return env


def _start(workdir, *args, env):
  return subprocess.Popen([sys.executable, '-m', 'jaxnas.main', *TINY, *args, f'--workdir={workdir}'],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process) -> str:
  out, _ = process.communicate(timeout=900)
  assert process.returncode == 0, out[-3000:]
  return out


def _run(workdir, *args, devices=1) -> str:
  return _finish(_start(workdir, *args, env=_env(devices)))


def _alphas(workdir) -> dict:
  with np.load(os.path.join(workdir, 'alphas.npz')) as f:
    return {k: f[k] for k in f.files}


def _assert_alphas_close(a, b):
  assert a.keys() == b.keys()
  for k in a:
    # Different reduction orders across devices: float32 round-off, amplified a little by Adam over 4 steps.
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-5, err_msg=k)
  assert not np.allclose(a['normal'], 0, atol=1e-2)  # the alphas moved: the comparison is not vacuous


@pytest.fixture(scope='module')
def single_device(tmp_path_factory):
  """The reference: the same global batch on one device, one process."""
  workdir = tmp_path_factory.mktemp('one_device')
  _run(workdir, '--config.parallel.num_devices=1', devices=1)
  return _alphas(workdir)


def test_eight_devices_match_one_and_checkpoint_restores_on_one(tmp_path, single_device):
  eight = tmp_path / 'eight'
  out = _run(eight, devices=8)
  assert '8 of 8 cpu device(s)' in out
  _assert_alphas_close(_alphas(eight), single_device)
  # A search stopped after 3 steps on 8 devices resumes on 1 device to the same result.
  resumed = tmp_path / 'resumed'
  _run(resumed, '--config.max_steps=3', devices=8)
  out = _run(resumed, '--config.parallel.num_devices=1', devices=1)
  assert 'resuming at step 3' in out
  _assert_alphas_close(_alphas(resumed), single_device)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, single_device):
  workdir = tmp_path / 'two_processes'
  address = f'127.0.0.1:{_free_port()}'
  processes = [_start(workdir, '--config.parallel.distributed=True',
                      env=_env(1, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(k)))
               for k in range(2)]
  outputs = [_finish(p) for p in processes]
  assert '2 of 2 cpu device(s) in 2 process(es)' in outputs[0]
  _assert_alphas_close(_alphas(workdir), single_device)
  # Process 1 logged to its own directory; the checkpoints are shared.
  assert (workdir / 'process_1' / 'log.txt').is_file()
  assert not (workdir / 'process_1' / 'checkpoints').exists()
