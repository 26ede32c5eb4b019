"""Data parallelism over all devices and hosts with ``jax.jit`` + ``NamedSharding`` (pmap's successor).

The batch is sharded over the ``data`` axis of a 1-D device mesh; weights, alphas, BN statistics and
optimizer states are replicated. Because a jitted step computes the *global* mean loss of a sharded batch,
XLA inserts the all-reduces itself: gradients of weights and alphas are averaged across devices (alphas stay
identical everywhere — the classic DARTS DataParallel bug cannot happen), and BatchNorm statistics are
computed over the global batch (synchronised BN, unlike per-device BN under ``pmap``). A step therefore gives
the same result on 1 or N devices for the same global batch.

Multi-host: every process calls ``initialize()`` (``jax.distributed.initialize``), reads its own disjoint
slice of each global batch (``jaxnas.data.epoch_batches(process_index=..., process_count=...)``), and
``global_batch`` assembles the global array with ``jax.make_array_from_process_local_data``.

Memory and speed knobs used by the steps: gradient accumulation over strided micro-batches
(``micro_batches``, ``bilevel.accumulate_gradients``) and bfloat16 compute with float32 master weights
(``compute_cast``, used inside the networks' ``apply``).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost as ocp_multihost

DATA_AXIS = 'data'
COMPUTE_DTYPES = ('float32', 'bfloat16')
BARRIER_TIMEOUT_S = 3600  # the slowest process's compile of a step
# XLA:GPU of jaxlib 0.11 aborts the compile when it fuses the 1x1 convs' strided matrix products into Triton
# GEMMs (triton_tiling_propagation.cc: Check failed: subdim_size_accumulator == dim_size): cuBLAS runs them.
GPU_OPTIONS = {'xla_gpu_enable_triton_gemm': False}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = 'gloo') -> None:
  """Starts JAX's distributed runtime when this is a multi-process launch.

  With no arguments, TPU pods, SLURM and Open MPI launches are detected by JAX itself; explicit
  arguments (or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment
  variables) serve any other launcher, e.g. several CPU processes on one machine.
  """
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  num_processes = num_processes or _int_env('JAX_NUM_PROCESSES')
  process_id = process_id if process_id is not None else _int_env('JAX_PROCESS_ID')
  if jax.config.jax_platforms in (None, '', 'cpu') and cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()


def compiler_options() -> dict | None:
  """XLA options of the training loops' steps on the current backend.

  XLA:CPU: LLVM at optimisation level 1 instead of 2; the DARTS supernet step compiles ~25% faster at the
  same step time (benchmarks/RESULTS.md); a level set in ``XLA_FLAGS`` is kept. XLA:GPU: ``GPU_OPTIONS``.
  TPU: XLA's defaults.
  """
  backend = jax.default_backend()
  if backend == 'cpu':
    return None if xla_flag_set('xla_backend_optimization_level') else {'xla_backend_optimization_level': 1}
  return dict(GPU_OPTIONS) if backend == 'gpu' else None


def xla_flag_set(name: str) -> bool:
  """Whether ``XLA_FLAGS`` sets the XLA option ``name``."""
  return f'--{name}=' in os.environ.get('XLA_FLAGS', '')


def add_xla_flags(options: dict) -> None:
  """Adds ``options`` to ``XLA_FLAGS``, those not set there already (the user's settings win), so that every
  jitted function of the process gets them; effective when called before JAX starts its backends."""
  for name, value in options.items():
    if not xla_flag_set(name):
      os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --{name}={str(value).lower()}".strip()


def set_gpu_xla_flags() -> None:
  """``add_xla_flags(GPU_OPTIONS)``, so that every jitted function of the process gets them, not only the
  steps (the CLI calls it before JAX starts its backends). XLA on other backends accepts and ignores them."""
  add_xla_flags(GPU_OPTIONS)


def step_runner(num_static: int):
  """``run(step, *args)`` runs a training loop's step (its first ``num_static`` arguments static) jitted
  with ``compiler_options()``.

  With several processes, every new combination of static arguments is compiled ahead of time and the
  processes meet at a barrier of the coordination service before its first run: they then enter the step's
  first collective together. Without it, a process that compiles 30 s longer than another (a loaded host)
  makes the CPU collectives' rendezvous give up (Gloo's fixed 30 s). The compiled executables take
  arguments of the shapes, dtypes and shardings they were compiled for.
  """
  jitted, compiled = {}, {}

  def run(step, *args):
    if step not in jitted:
      jitted[step] = jax.jit(step, static_argnums=tuple(range(num_static)), compiler_options=compiler_options())
    if jax.process_count() == 1:
      return jitted[step](*args)
    key = step, tuple(args[:num_static])
    if key not in compiled:
      compiled[key] = jitted[step].lower(*args).compile()
      # Naming the processes selects the coordination service's barrier (not a collective with Gloo's deadline).
      ocp_multihost.sync_global_processes(f'jaxnas_compiled_{len(compiled)}_{step.__name__}',
                                          timeout=BARRIER_TIMEOUT_S, processes=set(range(jax.process_count())))
    return compiled[key](*args[num_static:])

  return run


def _int_env(name):
  value = os.environ.get(name)
  return int(value) if value else None


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over all (or the first ``num_devices``) global devices."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices but only {len(devices)} exist: lower '
                       'parallel.num_devices or launch on more devices')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> int:
  """The per-device batch size; the global batch must split evenly over devices and processes, and each
  device's share into ``grad_accum_steps`` micro-batches."""
  n = mesh.devices.size
  if grad_accum_steps < 1:
    raise ValueError(f'parallel.grad_accum_steps={grad_accum_steps}: use 1 (no accumulation) or more')
  if global_batch_size % (n * grad_accum_steps) or global_batch_size % jax.process_count():
    raise ValueError(f'global batch size {global_batch_size} does not split over {n} devices / '
                     f'{jax.process_count()} processes and {grad_accum_steps} micro-batch(es): choose a multiple '
                     f'of {n * grad_accum_steps}')
  return global_batch_size // n


def micro_batches(batch, k: int):
  """Every array of ``batch`` (leading axis B) as ``(k, B / k, ...)``: micro-batch j holds examples j, j + k,
  j + 2k, ... A device holding a contiguous shard of the batch holds its share of every micro-batch, so
  splitting needs no communication, and the micro-batches do not depend on the number of devices."""
  return jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1), batch)


def check_compute_dtype(name: str) -> None:
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={name!r}: use one of {COMPUTE_DTYPES}')


def compute_cast(compute_dtype: str, tree):
  """Floating leaves of ``tree`` in the compute dtype: unchanged for 'float32' (compute in the weights' own
  dtype), bfloat16 casts of the float32 master weights and inputs for 'bfloat16' (their gradients flow back
  to float32 through the casts)."""
  if compute_dtype == 'float32':
    return tree
  dtype = jnp.dtype(compute_dtype)
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def global_batch(local_batch, mesh: Mesh):
  """Assembles this process's slice of a global batch (a pytree of numpy arrays) into sharded global
  arrays; on one process this is a sharded ``device_put``."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)


def replicate(tree, mesh: Mesh):
  """Places a pytree (weights, alphas, optimizer states) replicated on every device of the mesh. Every
  process must hold the same values (they derive from the same seed)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda leaf: _global_replica(leaf, sharding), tree)


def _global_replica(leaf, sharding: NamedSharding):
  """One process's copy of a replicated leaf as a global array (typed PRNG keys through their key data)."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = _global_replica(jax.random.key_data(leaf), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  host = np.asarray(leaf)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
