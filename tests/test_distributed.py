"""Data-parallel search and training through the real entry point: 8 devices == 1 device, 2 processes ==
1 process.

Each run is ``python -m jaxnas.main`` in a subprocess, because the number of host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``) and JAX's distributed runtime are fixed when JAX
starts. The two-process run uses JAX's distributed runtime on localhost with CPU (gloo) collectives, which is
the code path of a multi-host TPU pod or GPU cluster: per-process input slices, global arrays, shared
checkpoints.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxnas import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PRIMITIVES = ('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
# A tiny search on 8x8 digits: 32 examples = 16 train + 16 val, global batch 8 (1 per device on 8), 2 epochs.
TINY = [f'--config={REPO_ROOT / "configs" / "darts.py"}:smoke', '--config.model.init_channels=2',
        '--config.model.layers=3', f'--config.model.primitives={PRIMITIVES}', '--config.data.num_examples=32',
        '--config.search.batch_size=8', '--config.search.epochs=2', '--config.arch.lr=0.01']


def _env(devices: int = 1, **extra) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', **extra)
  env.pop('JAX_ENABLE_X64', None)
  return env


def _start(workdir, *args, env, base=TINY, launcher=('-m', 'jaxnas.main')):
  return subprocess.Popen([sys.executable, *launcher, *base, *args, f'--workdir={workdir}'],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process) -> str:
  out, _ = process.communicate(timeout=900)
  assert process.returncode == 0, out[-3000:]
  return out


def _run(workdir, *args, devices=1) -> str:
  return _finish(_start(workdir, *args, env=_env(devices)))


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


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


# Process 1 runs the entry point with its first XLA compilation delayed: a host that compiles the step 40 s
# later than the other. CPU collectives give up after 30 s, so this passes only because the loops compile
# every step ahead and meet at a barrier before its first run (``parallel.step_runner``).
SLOW_COMPILE = """
import runpy, time
from jax._src.interpreters import pxla
compile_, delayed = pxla.MeshComputation.compile, []
def slow_compile(self, *args, **kwargs):
  if not delayed:
    delayed.append(time.sleep(40))
  return compile_(self, *args, **kwargs)
pxla.MeshComputation.compile = slow_compile
runpy.run_module('jaxnas.main', run_name='__main__', alter_sys=True)
"""


def test_two_processes_match_one_with_a_slow_host(tmp_path, single_device):
  workdir = tmp_path / 'two_processes'
  address = f'127.0.0.1:{_free_port()}'
  processes = [_start(workdir, '--config.parallel.distributed=True',
                      env=_env(1, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(k)),
                      launcher=['-c', SLOW_COMPILE] if k else ['-m', 'jaxnas.main'])
               for k in range(2)]
  outputs = [_finish(p) for p in processes]
  assert '2 of 2 cpu device(s) in 2 process(es)' in outputs[0]
  _assert_alphas_close(_alphas(workdir), single_device)
  # Process 1 logged to its own directory; the checkpoints are shared.
  assert (workdir / 'process_1' / 'log.txt').is_file()
  assert not (workdir / 'process_1' / 'checkpoints').exists()


# Training of a tiny DARTS_V2 network on 8x8 digits: 32 training images, global batch 16 in 2 micro-batches
# (gradient accumulation; on 8 devices each holds 1 example of each micro-batch), 1 epoch of 2 steps with crop +
# cutout augmentation.
TINY_TRAIN = [f'--config={REPO_ROOT / "configs" / "train_std.py"}:smoke', '--config.data.num_examples=32',
              '--config.train.epochs=1', '--config.train.eval_every_epochs=0', '--config.parallel.grad_accum_steps=2']


def test_training_on_eight_devices_matches_one(tmp_path):
  runs = {n: tmp_path / f'devices_{n}' for n in (1, 8)}
  processes = {n: _start(runs[n], f'--config.parallel.num_devices={n}', env=_env(n), base=TINY_TRAIN)
               for n in runs}
  outputs = {n: _finish(p) for n, p in processes.items()}
  assert '; 8 cpu device(s)' in outputs[8] and 'training done' in outputs[8]
  (net, one, step_one), (_, eight, step_eight) = (train.load_trained(str(runs[n])) for n in (1, 8))
  assert step_one == step_eight == 2
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one)[0], jax.tree.leaves(eight)):
    # Different reduction orders across devices: float32 round-off (measured 2.4e-7).
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  losses = [[r['train/loss'] for r in _metrics(runs[n]) if 'train/loss' in r] for n in (1, 8)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  initial = train.init_state(net, jax.random.key(0), (8, 8, 1)).params  # seed 0: the weights both runs started from
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one['params']),
                                                          jax.tree.leaves(initial))) > 1e-3
