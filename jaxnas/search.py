"""The search driver: ``run(config, workdir)`` runs one bi-level architecture search end to end.

Every method (DARTS, DSARA, AdvRush, DSRNA, E2RNAS, RNAS) is this loop with another config: the objectives
of each level (``config.search.lower`` / ``config.search.upper``), the combiner and the schedules. Each step
updates the alphas on a val batch (``bilevel.arch_step``), then the weights on a train batch
(``bilevel.weight_step``), in the order of quark0/darts ``train_search.py``, as one compiled program
(``bilevel.search_step``; epochs before ``config.arch.start_epoch`` run the weight step alone). See
``jaxnas.workdir`` for the files a run writes. Rerunning the same command in the same workdir resumes from
the latest checkpoint and gives the same alphas as an uninterrupted run: the data order is a function of
(seed, epoch), randomness a function of (seed, step).
"""
from __future__ import annotations

import collections
import inspect
import math
import os
from typing import Iterator

import jax
import ml_collections
import numpy as np

from jaxnas import bilevel, checkpoint, data, genotypes, parallel, schedules, search_space
from jaxnas import workdir as workdir_lib
from jaxnas.objectives import compose


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------
def objective(name: str, weight: float = 1.0, label: str = '', start_epoch: int = 0, end_epoch: int = -1,
              **kwargs) -> ml_collections.ConfigDict:
  """A config entry of ``config.search.lower`` / ``upper``, listing every argument of the objective (its
  defaults updated by ``kwargs``) so each can be overridden on the command line."""
  if name not in compose.OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}: choose one of {sorted(compose.OBJECTIVES)}')
  params = inspect.signature(compose.OBJECTIVES[name]).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(f'objective {name!r} has no argument {unknown[0]!r}: its kwargs are '
                     f'{[p for p in params if p != "ctx"]}')
  defaults = {p: v.default for p, v in params.items() if p != 'ctx'}
  return ml_collections.ConfigDict(dict(name=name, weight=weight, label=label, start_epoch=start_epoch,
                                        end_epoch=end_epoch, kwargs={**defaults, **kwargs}))


def default_config() -> ml_collections.ConfigDict:
  """Every field of a search config, with the DARTS settings (Liu et al. 2019; quark0/darts)."""
  no_data = data.default_config()
  no_data.source = ''
  return ml_collections.ConfigDict(dict(
      mode='search',              # search | derive | train | evaluate | pipeline (jaxnas.main.MODES)
      seed=0,                     # weights, alphas, data order and all randomness derive from it
      data=data.default_config(),  # see jaxnas.data.default_config; DARTS: val_fraction 0.5
      ood_data=no_data,           # out-of-distribution images for 'ood_kl' (E2RNAS); source '' = none
      model=dict(
          space='darts',          # 'darts' or 'dsara'
          init_channels=16, layers=8, steps=4, multiplier=4, stem_multiplier=3,
          primitives=(),          # () = the space's; else a subset of jaxnas.ops.OPS
          placement='',           # DSARA cell placement, e.g. 'A-A-R' ('' = the space's)
          widths=(),              # width multiplier per stage, e.g. (1, 2, 2) (() = the space's)
          depthwise='auto',       # depthwise conv formulation: auto | shift | autodiff | grouped
          remat=False,            # recompute each cell's activations in the backward pass (less memory)
          compute_dtype='float32'),  # 'bfloat16': bf16 activations; weights, optimizer, BN stats, losses float32
      search=dict(
          epochs=50, batch_size=64,
          lower=[objective('ce')],  # weights descend sum_k weight_k * objective_k on train batches
          upper=[objective('ce')]),  # alphas descend the combined gradient on val batches
      optim=dict(lr=0.025, lr_min=0.001, momentum=0.9, weight_decay=3e-4, grad_clip=5.0),  # weights: SGD
      arch=dict(
          lr=3e-4, lr_boundaries=(), lr_values=(),  # Adam lr; from epoch lr_boundaries[i] on: lr_values[i]
          b1=0.5, b2=0.999, eps=1e-8, weight_decay=1e-3,
          order=1,                # 1: first order; 2: unrolled (DARTS second order)
          hvp='finite_difference',  # second-order Hessian-vector product: finite_difference | exact
          fd_radius=0.01,
          combiner='sum',         # sum | mgda (2 objectives) | min_norm (n objectives)
          normalize=False,        # min_norm on l2-normalised gradients (E2RNAS)
          start_epoch=0,          # architecture updates start here (RNAS warm-up: 15)
          projection=dict(        # alphas projected onto {objective <= bound} (RNAS); name '' = off
              objective=dict(name='', label='constraint', kwargs={}),
              bound=0.0, start_fraction=0.5, bisection_steps=20, inner_steps=10)),
      parallel=dict(              # data parallelism over all devices and processes (jaxnas.parallel)
          num_devices=0,          # 0: every device of every process; n: the first n
          per_device_batch_size=0,  # > 0: the global batch is this times the number of devices
          grad_accum_steps=1,     # > 1: each weight step accumulates the gradient over this many micro-batches
          distributed=False),     # multi-process launch: start jax.distributed (TPU pods, SLURM, env vars)
      checkpoint_every_steps=500,  # plus one at the end of every epoch
      keep_checkpoints=3,
      log_every_steps=50,
      max_steps=0,                # stop after this many steps (0 = run to the end); rerun to continue
  ))


# ------------------------------------------------------------------------------------------------
# Building blocks: model, program, data streams.
# ------------------------------------------------------------------------------------------------
def make_space(model_config) -> search_space.SearchSpace:
  """The search space of ``config.model`` (space name, DSARA placement/widths, primitive subset)."""
  return search_space.make_space(model_config.space, model_config.placement or None,
                                 tuple(model_config.widths) or None, tuple(model_config.primitives) or None)


def make_model(model_config, dataset: data.Dataset) -> search_space.Supernet:
  """The supernet of ``config.model`` for a dataset (classes, normalisation inside the model)."""
  return search_space.Supernet(
      space=make_space(model_config), init_channels=model_config.init_channels, layers=model_config.layers,
      num_classes=dataset.num_classes, steps=model_config.steps, multiplier=model_config.multiplier,
      stem_multiplier=model_config.stem_multiplier, mean=dataset.mean, std=dataset.std,
      depthwise=model_config.depthwise, remat=model_config.get('remat', False),
      compute_dtype=model_config.get('compute_dtype', 'float32'))


def make_program(config, model, dataset: data.Dataset) -> bilevel.Program:
  """The static step description: objectives of both levels, optimizer settings, augmentation, projection."""
  o, a, d = config.optim, config.arch, config.data
  projection = None
  if a.projection.objective.name:
    projection = bilevel.Projection(
        objective=compose.spec_from_config(a.projection.objective, 'config.arch.projection.objective'),
        bound=float(a.projection.bound), bisection_steps=a.projection.bisection_steps,
        inner_steps=a.projection.inner_steps)
  return bilevel.Program(
      model=model, input_shape=tuple(dataset.image_shape),
      lower=compose.specs_from_config(config.search.lower, 'config.search.lower'),
      upper=compose.specs_from_config(config.search.upper, 'config.search.upper'),
      weights=bilevel.WeightOptim(momentum=o.momentum, weight_decay=o.weight_decay, grad_clip=o.grad_clip),
      arch=bilevel.ArchOptim(b1=a.b1, b2=a.b2, eps=a.eps, weight_decay=a.weight_decay, order=a.order,
                             hvp=a.hvp, fd_radius=a.fd_radius, combiner=a.combiner, normalize=a.normalize),
      augment=bilevel.Augment(crop_padding=d.crop_padding, flip=d.flip, cutout=d.cutout,
                              fill=tuple(dataset.mean)),
      projection=projection, grad_accum_steps=grad_accum_steps(config))


def _cycle(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, start: int) -> Iterator:
  """Endless batches (this process's slices) of a split from global position ``start``: pass ``c`` visits
  the split in the order of ``(seed, c)``, so the stream is a pure function of the position (val, OoD)."""
  passes, position = divmod(start, data.num_batches(len(labels), batch_size))
  while True:
    yield from data.epoch_batches(images, labels, batch_size, seed, passes, start_step=position,
                                  **_process_slice())
    passes, position = passes + 1, 0


def _process_slice() -> dict:
  """Each process reads its own contiguous slice of every global batch."""
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


def grad_accum_steps(config) -> int:
  """``parallel.grad_accum_steps`` (1 for configs without it)."""
  return config.parallel.get('grad_accum_steps', 1) if 'parallel' in config else 1


def global_batch_size(config, mesh) -> int:
  """``search.batch_size``, or ``parallel.per_device_batch_size`` times the devices; checked to split evenly
  over the devices and into micro-batches."""
  per_device = config.parallel.per_device_batch_size if 'parallel' in config else 0
  batch_size = per_device * mesh.devices.size if per_device else config.search.batch_size
  parallel.check_batch_size(batch_size, mesh, grad_accum_steps(config))
  return batch_size


def output_dir(workdir: str) -> str:
  """Where this process writes logs and results: the workdir for process 0, ``workdir/process_<k>`` for the
  others of a multi-process run (checkpoints are shared: orbax coordinates the processes)."""
  k = jax.process_index()
  return workdir if k == 0 else os.path.join(workdir, f'process_{k}')


def _seeds(seed: int) -> tuple[int, int, int]:
  """Independent data-order seeds for the train, val and OoD streams."""
  return tuple(int(s) for s in np.random.SeedSequence(seed).generate_state(3))


def alpha_entropy(alphas) -> dict[str, float]:
  """Mean over edges of the entropy of softmax(alpha) per cell type (log(#ops) at the uniform start)."""
  out = {}
  for t, a in alphas.items():
    a = np.asarray(a, np.float64)
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[t] = float(np.mean(-np.sum(p * np.log(np.maximum(p, 1e-30)), axis=-1)))
  return out


def op_counts(genotype: genotypes.Genotype) -> dict[str, dict[str, int]]:
  """How often each op appears in each cell of a genotype (skip_connect collapse shows here)."""
  return {t: dict(collections.Counter(op for op, _ in genotype[t]).most_common())
          for t in genotype.cell_types}


def check_finite(metrics: dict, step: int, epoch: int, phase: schedules.Phase, last_checkpoint: str,
                 fix: str = 'lower the learning rates (config.optim.lr, config.arch.lr) or check the data') -> None:
  """Raises a one-line FloatingPointError naming the first non-finite objective of a step and its level, or the
  weights / alphas when an update made them non-finite (``*_finite`` flags of the steps). ``step`` and ``epoch``
  are numbered as the log numbers them (from 1)."""
  objectives = ([f'train/{label}' for label in phase.lower] + [f'val/{label}' for label in phase.upper])
  problem = None
  for key in objectives:
    if key in metrics and not math.isfinite(float(metrics[key])):
      level, label = key.split('/', 1)
      problem = (f'{"NaN" if math.isnan(float(metrics[key])) else "inf"} in the '
                 f'{"weight" if level == "train" else "architecture"} step\'s objective {label!r}')
      break
  else:
    for key, what in (('arch/alphas_finite', 'alphas'), ('train/weights_finite', 'weights')):
      if key in metrics and not metrics[key]:
        problem = f'NaN or inf in the {what} after the update'
        break
  if problem:
    kept = f'last good checkpoint kept at {last_checkpoint}' if last_checkpoint else 'no checkpoint written yet'
    raise FloatingPointError(f'{problem} at step {step} (epoch {epoch}); {kept}; {fix}')


def _format(metrics: dict, keys=None) -> str:
  keys = keys or sorted(k for k in metrics if k.endswith('loss') or k.endswith('acc'))
  return ' '.join(f'{k} {metrics[k]:.4g}' for k in keys if k in metrics)


# ------------------------------------------------------------------------------------------------
# The search.
# ------------------------------------------------------------------------------------------------
def run(config, workdir: str) -> genotypes.Genotype | None:
  """Runs (or resumes) the search of ``config`` in ``workdir``; returns the final genotype (None when the
  run stopped early at ``config.max_steps``)."""
  os.makedirs(output_dir(workdir), exist_ok=True)
  console = workdir_lib.Console(output_dir(workdir))
  try:
    return _search(config, workdir, console)
  except Exception as e:
    console.log(f'error: {type(e).__name__}: {e}', terminal=False)
    raise
  finally:
    console.close()


def _search(config, workdir: str, console: workdir_lib.Console):
  # ----------------------------------------------------------------------------
  # Config, data and model.
  # ----------------------------------------------------------------------------
  ckpt_dir = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
  workdir = output_dir(workdir)
  resuming = checkpoint.latest_step(ckpt_dir) is not None
  if resuming:
    workdir_lib.check_same_run(workdir, config)
  workdir_lib.write_config(workdir, config)
  dataset = data.load(config.data)
  train, val = data.search_split(dataset, config.data.val_fraction, seed=None)
  mesh = parallel.make_mesh(config.parallel.num_devices or None)
  batch_size, epochs = global_batch_size(config, mesh), config.search.epochs
  steps_per_epoch = data.num_batches(len(train.labels), batch_size)
  data.num_batches(len(val.labels), batch_size)  # the val split needs a full batch too
  train_seed, val_seed, ood_seed = _seeds(config.seed)
  ood = None
  if config.ood_data.source:
    ood = data.load(config.ood_data)
    if ood.image_shape != dataset.image_shape:
      raise ValueError(f'config.ood_data has images of shape {ood.image_shape}, the data {dataset.image_shape}: '
                       'use an OoD set of the same image shape')
  model = make_model(config.model, dataset)
  program = make_program(config, model, dataset)
  total_steps = epochs * steps_per_epoch

  # ----------------------------------------------------------------------------
  # State: fresh, or restored from the latest checkpoint of the workdir.
  # ----------------------------------------------------------------------------
  # Replicated on the mesh like a restored state (whose leaves take the target's sharding): the steps compile
  # once for both. Batches are sharded over the mesh, so XLA averages gradients and BN statistics over the
  # global batch (jaxnas.parallel).
  state = parallel.replicate(
      bilevel.init_state(program, jax.random.key(config.seed), train.images[:batch_size]), mesh)
  payload = {'state': state, 'epoch': 0, 'step_in_epoch': 0, 'steps_per_epoch': steps_per_epoch}
  last_checkpoint = ''
  if resuming:
    payload = checkpoint.restore_checkpoint(ckpt_dir, payload)
    if payload['steps_per_epoch'] != steps_per_epoch:
      raise ValueError(f'the checkpoint in {ckpt_dir} was written with {payload["steps_per_epoch"]} steps per '
                       f'epoch, this config gives {steps_per_epoch}: use the original batch size and data, or a '
                       'new workdir')
    state = payload['state']
    if payload['epoch'] * steps_per_epoch + payload['step_in_epoch'] != int(state.step):
      raise ValueError(f'the latest checkpoint in {ckpt_dir} is inconsistent (data position epoch '
                       f'{payload["epoch"]} step {payload["step_in_epoch"]} vs step {int(state.step)}): delete it '
                       'to resume from the previous one')
    last_checkpoint = os.path.join(ckpt_dir, str(int(state.step)))
  step = int(state.step)
  n_weights = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
  console.log(f'{"resuming at" if step else "starting"} step {step}/{total_steps} in {workdir}')
  console.log(f'data {dataset.name}: {len(train.labels)} train / {len(val.labels)} val images '
              f'{dataset.image_shape}, {steps_per_epoch} steps per epoch of batch {batch_size}, {epochs} epochs')
  console.log(f'supernet {model.space.name}: C={model.init_channels}, {model.layers} cells, '
              f'{n_weights / 1e6:.3f}M weights, alphas {({t: a.shape for t, a in state.alphas.items()})}; '
              f'{mesh.devices.size} of {jax.device_count()} {jax.default_backend()} device(s) in '
              f'{jax.process_count()} process(es), global batch {batch_size}')
  console.log(f'lower level: {[s.label for s in program.lower]}; upper level: {[s.label for s in program.upper]} '
              f'({program.arch.combiner}, order {program.arch.order}); the first step compiles (minutes)')

  writer = workdir_lib.MetricWriter(workdir, resume_step=step)

  def save(step_: int, epoch: int, step_in_epoch: int) -> str:
    checkpoint.save_checkpoint(ckpt_dir, step_, {'state': state, 'epoch': epoch, 'step_in_epoch': step_in_epoch,
                                                 'steps_per_epoch': steps_per_epoch},
                               keep=config.keep_checkpoints)
    return os.path.join(ckpt_dir, str(step_))

  # ----------------------------------------------------------------------------
  # The loop: architecture step on a val batch, weight step on a train batch.
  # ----------------------------------------------------------------------------
  val_stream = _cycle(val.images, val.labels, batch_size, val_seed, step)
  ood_stream = (_cycle(ood.train_images, ood.train_labels, batch_size, ood_seed, step)
                if ood is not None else None)
  train_stream = None
  run_step = parallel.step_runner(num_static=2)
  epoch_values, window_values = collections.defaultdict(list), collections.defaultdict(list)
  try:
    while step < total_steps:
      epoch, step_in_epoch = divmod(step, steps_per_epoch)
      if train_stream is None or step_in_epoch == 0:
        train_stream = data.epoch_batches(train.images, train.labels, batch_size, train_seed, epoch,
                                          start_step=step_in_epoch, **_process_slice())
      phase = schedules.phase(program.lower, program.upper, epoch=epoch, step_in_epoch=step_in_epoch,
                              steps_per_epoch=steps_per_epoch, arch_start_epoch=config.arch.start_epoch,
                              project_from=config.arch.projection.start_fraction if program.projection else None)
      hparams = {'w_lr': np.float32(schedules.cosine_lr(config.optim.lr, config.optim.lr_min, epochs, epoch)),
                 'a_lr': np.float32(schedules.piecewise_lr(config.arch.lr, config.arch.lr_boundaries,
                                                           config.arch.lr_values, epoch))}
      tb, vb = next(train_stream), next(val_stream)
      train_batch = {'image': tb.images, 'label': tb.labels}
      val_batch = {'image': vb.images, 'label': vb.labels}
      if ood_stream is not None:
        ood_images = next(ood_stream).images
        train_batch['ood_image'] = val_batch['ood_image'] = ood_images
      epoch_field = {'epoch': np.int32(epoch)}
      train_batch = {**parallel.global_batch(train_batch, mesh), **epoch_field}
      val_batch = {**parallel.global_batch(val_batch, mesh), **epoch_field}

      if phase.arch:
        new_state, metrics = run_step(bilevel.search_step, program, phase, state, train_batch, val_batch, hparams)
      else:
        new_state, metrics = run_step(bilevel.weight_step, program.lower_level, phase.weights_only, state,
                                      train_batch, hparams)
      metrics = jax.device_get(metrics)
      metrics.update({'train/lr': hparams['w_lr'], 'arch/lr': hparams['a_lr']})
      check_finite(metrics, step + 1, epoch + 1, phase, last_checkpoint)
      metrics = {k: v for k, v in metrics.items() if not k.endswith('_finite')}
      state, step = new_state, step + 1

      for k, v in metrics.items():
        epoch_values[k].append(float(v))
        window_values[k].append(float(v))
      console.progress(step, total_steps, f'epoch {epoch + 1}/{epochs} ' + _format(metrics, (
          'train/loss', 'train/ce_acc', 'val/loss')))
      if step % config.log_every_steps == 0 or step == total_steps:
        means = {k: float(np.mean(v)) for k, v in window_values.items()}
        writer.write(step, means, epoch=epoch)
        console.log(f'step {step}/{total_steps} (epoch {epoch + 1}/{epochs}) {_format(means)} | '
                    f'{console.eta(step, total_steps)}', terminal=not console.interactive)
        window_values.clear()

      if step % steps_per_epoch == 0:
        _end_of_epoch(workdir, console, writer, model, state, epoch, epochs, step,
                      {k: float(np.mean(v)) for k, v in epoch_values.items()})
        epoch_values.clear()
        last_checkpoint = save(step, epoch + 1, 0)
      elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        last_checkpoint = save(step, epoch, step_in_epoch + 1)
      if config.max_steps and step >= config.max_steps and step < total_steps:
        if step % steps_per_epoch and not (config.checkpoint_every_steps and
                                           step % config.checkpoint_every_steps == 0):
          last_checkpoint = save(step, epoch, step_in_epoch + 1)
        console.log(f'stopped at step {step} (config.max_steps); rerun without max_steps to continue')
        return None
  finally:
    writer.close()

  # ----------------------------------------------------------------------------
  # Result: the final genotype and alphas.
  # ----------------------------------------------------------------------------
  alphas = jax.device_get(state.alphas)
  genotype = model.derive(alphas)
  workdir_lib.save_alphas(workdir_lib.path(workdir, workdir_lib.ALPHAS), alphas)
  workdir_lib.save_genotype(workdir_lib.path(workdir, workdir_lib.GENOTYPE), genotype)
  console.log(f'search done: {workdir_lib.path(workdir, workdir_lib.GENOTYPE)}\n{genotype.to_json()}')
  return genotype


def _end_of_epoch(workdir, console, writer, model, state, epoch, epochs, step, means):
  """Per-epoch record: derived genotype and alphas in history/, entropy and op counts in log and metrics."""
  alphas = jax.device_get(state.alphas)
  genotype = model.derive(alphas)
  workdir_lib.save_genotype(workdir_lib.history_path(workdir, epoch, 'genotype'), genotype)
  workdir_lib.save_alphas(workdir_lib.history_path(workdir, epoch, 'alphas'), alphas)
  entropy = alpha_entropy(alphas)
  counts = op_counts(genotype)
  scalars = {f'epoch/{k}': v for k, v in means.items()}
  scalars.update({f'epoch/alpha_entropy_{t}': h for t, h in entropy.items()})
  scalars.update({f'epoch/skip_connect_{t}': c.get('skip_connect', 0) for t, c in counts.items()})
  writer.write(step, scalars, epoch=epoch)
  cells = '; '.join(f'{t}: ' + ', '.join(f'{n} {op}' for op, n in c.items()) for t, c in counts.items())
  console.log(f'epoch {epoch + 1}/{epochs} done | {_format(means)} | alpha entropy '
              + ' '.join(f'{t} {h:.4f}' for t, h in entropy.items()) + f' | genotype {cells}')


def derive(config, workdir: str) -> genotypes.Genotype:
  """Derives ``genotype.json`` from the workdir's final ``alphas.npz`` by the DARTS rule (``derive`` mode)."""
  alphas = workdir_lib.load_alphas(workdir_lib.path(workdir, workdir_lib.ALPHAS))
  space = make_space(config.model)
  missing = set(space.cell_types) - set(alphas)
  if missing:
    raise ValueError(f'{workdir}/alphas.npz lacks cell types {sorted(missing)} of the {space.name} space: '
                     'derive with the config the search ran with')
  genotype = genotypes.derive({t: alphas[t] for t in space.cell_types}, space.primitives,
                              config.model.steps, config.model.multiplier)
  workdir_lib.save_genotype(workdir_lib.path(workdir, workdir_lib.GENOTYPE), genotype)
  return genotype
