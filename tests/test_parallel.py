"""Data parallelism: a supernet gradient on 8 CPU devices equals 1 device in float64.

XLA_FLAGS must be set before JAX starts, so the comparison runs in a subprocess with 8 host devices. The
evaluation-network step on 8 devices is compared through ``jaxnas.main`` in tests/test_distributed.py.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update('jax_enable_x64', True)
    from jaxnas import parallel, search_space
    assert jax.device_count() == 8, jax.devices()

    def ce(logits, y):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 16, 16, 3))
    y = rng.integers(0, 10, 16)

    net = search_space.Supernet(init_channels=2, layers=3)
    v = net.init(jax.random.PRNGKey(0), x)
    alphas = net.init_alphas(jax.random.PRNGKey(1))
    def search_loss(params, alphas, stats, x, y):
      logits, new_stats = net.apply({'params': params, 'batch_stats': stats}, alphas, x, train=True)
      return ce(logits, y), new_stats
    step = jax.jit(jax.value_and_grad(search_loss, (0, 1), has_aux=True))
    single = step(v['params'], alphas, v['batch_stats'], x, y)

    mesh = parallel.make_mesh()
    assert parallel.check_batch_size(16, mesh) == 2
    rep = lambda t: parallel.replicate(t, mesh)
    xb, yb = parallel.global_batch((x, y), mesh)
    assert len(xb.sharding.device_set) == 8
    sharded = step(rep(v['params']), rep(alphas), rep(v['batch_stats']), xb, yb)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)
    (_, _), (_, g_alpha) = sharded
    for leaf in jax.tree.leaves(g_alpha):  # alphas' gradient identical on every device
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      assert len(shards) == 8 and all(np.array_equal(shards[0], s) for s in shards)
    print('PARALLEL-OK')
''')


def test_eight_devices_match_one():
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, env=env, timeout=900)
  assert out.returncode == 0 and 'PARALLEL-OK' in out.stdout, out.stderr[-3000:]


def test_mesh_errors():
  import pytest  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='asked for 99 devices'):
    parallel.make_mesh(99)
  mesh = parallel.make_mesh()
  assert parallel.check_batch_size(8, mesh) == 8 // mesh.devices.size


def test_cpu_step_options_keep_an_optimisation_level_set_in_xla_flags(monkeypatch):
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert parallel.compiler_options() == {'xla_backend_optimization_level': 1}
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=3')
  assert parallel.compiler_options() is None


def test_gpu_xla_flags_added_once_and_never_override_the_user(monkeypatch):
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  parallel.set_gpu_xla_flags()
  parallel.set_gpu_xla_flags()
  assert os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 '
                                     '--xla_gpu_enable_triton_gemm=false')
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_triton_gemm=true')
  parallel.set_gpu_xla_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_gpu_enable_triton_gemm=true'
  monkeypatch.delenv('XLA_FLAGS')
  parallel.set_gpu_xla_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_gpu_enable_triton_gemm=false'
  # XLA on the CPU accepts the flag: a fresh process computes with it.
  out = subprocess.run([sys.executable, '-c', 'import jax.numpy as jnp; print(float((jnp.ones(3) @ jnp.ones(3))))'],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == '3.0', out.stderr[-2000:]


def test_step_runner_traces_each_static_combination_once():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  traces = []

  def scale(k, x, y):
    traces.append(('scale', k))
    return k * x + y

  def power(k, x):
    traces.append(('power', k))
    return x ** k

  run = parallel.step_runner(num_static=1)
  x, y = jnp.arange(4.0), jnp.ones(4)
  for _ in range(2):
    np.testing.assert_array_equal(run(scale, 2, x, y), 2 * x + y)
    np.testing.assert_array_equal(run(power, 3, 2 * x), (2 * x) ** 3)
  assert sorted(traces) == [('power', 3), ('scale', 2)]  # new data, same static arguments: no retrace
  np.testing.assert_array_equal(run(scale, 5, x, y), 5 * x + y)  # new static argument: traced on first run
  assert traces[-1] == ('scale', 5) and len(traces) == 3
