"""Retraining of a derived architecture: ``run(config, workdir)`` (``config.mode='train'``).

Trains the evaluation network (``networks.EvalNetwork``, NetworkCIFAR) of ``config.genotype`` (a zoo name, a
genotype JSON file or a search workdir) from scratch:

- standard training, the DARTS recipe (Liu et al. 2019, Sec. 3.3; quark0/darts ``train.py``): SGD lr 0.025
  with a per-epoch cosine schedule, momentum 0.9, weight decay 3e-4, gradient norm clipped to 5, auxiliary
  head weight 0.4, drop-path probability ramped linearly from 0 to 0.2, crop + flip + cutout 16;
- adversarial training (Madry et al. 2018, Eq. 2.1): the loss on PGD-k examples, eps 8/255, 7 steps
  (AdvRush: step 0.01, SGD lr 0.1 divided by 10 from the 100th and the 150th of 200 epochs, weight
  decay 1e-4); or
  TRADES (Zhang et al. 2019, Eq. 5): ``CE(f(x)) + beta KL(f(x) || f(x'))`` with ``x'`` maximising the KL.

The weight update is one jitted step (``train_step``): augmentation, the attack (``pgd_attack.pgd`` inside the
same jit; by default against the network in inference mode, as the robust-NAS training code generates its
examples after ``model.eval()``), the train-mode forward pass (batch statistics, drop-path, auxiliary head)
and the SGD update of ``bilevel.weight_optimizer``. The batch is sharded over the ``data`` axis of a device
mesh and the state replicated (``jaxnas.parallel``), so the step runs data-parallel with BatchNorm over the
global batch. After every ``eval_every_epochs`` epochs the network is evaluated in inference mode on held-out
images (clean and PGD-``eval_steps`` accuracy at ``eval_eps``), which ``jaxnas viz`` draws as curves.

Workdir: ``config.json``, ``log.txt``, ``metrics.jsonl``, ``checkpoints/`` (state and step), ``genotype.json``
and ``network.json`` (what ``load_trained`` and ``jaxnas evaluate`` rebuild the network from). Rerunning the
same command resumes from the latest checkpoint and reproduces an uninterrupted run: the data order is a
function of (seed, epoch), randomness a function of (seed, step).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxnas import analysis, bilevel, checkpoint, data, genotypes, networks, parallel, schedules, search
from jaxnas import workdir as workdir_lib
from jaxnas.attacks import batching, pgd_attack

NETWORK = 'network.json'
NETWORK_FIX = 'training writes it; if it is damaged, rerun the training command in a new workdir'
ADVERSARIAL_METHODS = ('none', 'pgd', 'trades')
LR_SCHEDULES = ('cosine', 'piecewise')
TRACES: collections.Counter = collections.Counter()  # How often the jitted functions were traced (tests).

# Stream ids folded into the step key.
_AUGMENT, _ATTACK, _DROP_PATH, _DROP_PATH_ADV = range(4)


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------
def default_config() -> ml_collections.ConfigDict:
  """Every field of a training config, with the DARTS evaluation settings (standard training)."""
  return ml_collections.ConfigDict(dict(
      mode='train',
      seed=0,                     # weights, data order, held-out split and all randomness derive from it
      genotype='DARTS_V2',        # zoo name, genotype JSON file or search workdir (pipeline: the search result)
      data=data.default_config(),  # see jaxnas.data.default_config (augmentation: crop_padding, flip, cutout)
      train=dict(
          init_channels=36, layers=20,   # the evaluation network (NetworkCIFAR)
          compute_dtype='float32',  # 'bfloat16': bf16 activations; weights, optimizer, BN stats, losses float32
          remat=False,            # recompute each cell's activations in the backward pass (less memory)
          auxiliary=True, auxiliary_weight=0.4,
          drop_path_prob=0.2,     # ramped linearly: drop_path_prob * epoch / epochs
          epochs=600, batch_size=96,
          lr=0.025, lr_schedule='cosine',  # cosine: lr -> lr_min per epoch; piecewise: see lr_boundaries
          lr_min=0.0,
          lr_boundaries=(), lr_values=(),  # piecewise: lr_values[i] from epoch lr_boundaries[i] on
          momentum=0.9, weight_decay=3e-4, grad_clip=5.0,  # SGD as bilevel.weight_optimizer (0 = no clip)
          adversarial=dict(
              method='none',      # none | pgd (Madry) | trades
              eps=8 / 255, step_size=2 / 255, steps=7, norm='linf',
              random_start='uniform',  # uniform (in the ball) | normal (x + 0.001 N(0, 1): TRADES, AdvRush) | none
              attack_mode='eval',  # the network the attack sees: eval (running BN stats) | train
              trades_beta=6.0),
          holdout_fraction=0.0,   # > 0: hold out this fraction of the training set as the test split
          eval_every_epochs=1,    # per-epoch monitor on the test split (0 = off)
          eval_examples=500, eval_batch_size=100, eval_eps=8 / 255, eval_steps=20,
          max_steps=0),           # stop after this many steps (0 = run to the end); rerun to continue
      parallel=search.default_config().parallel,  # devices and processes, as for the search
      checkpoint_every_steps=500,  # plus one at the end of every epoch
      keep_checkpoints=3,
      log_every_steps=50,
  ))


def _check_config(config) -> None:
  """One-line errors for a config without training fields or with unknown choices."""
  missing = [k for k in ('genotype', 'train') if k not in config]
  if missing:
    raise ValueError(f'the config has no {missing} field(s) needed to train: start from configs/train_std.py, '
                     'configs/train_adv.py or configs/quickstart.py')
  t = config.train
  if not config.genotype:
    raise ValueError('config.genotype is empty: name a zoo genotype (e.g. DARTS_V2), a genotype JSON file or a '
                     'search workdir')
  if t.adversarial.method not in ADVERSARIAL_METHODS:
    raise ValueError(f'config.train.adversarial.method={t.adversarial.method!r}: use one of {ADVERSARIAL_METHODS}')
  if t.adversarial.random_start not in pgd_attack.STARTS:
    raise ValueError(f'unknown config.train.adversarial.random_start {t.adversarial.random_start!r}: use one of '
                     f'{list(pgd_attack.STARTS)}')
  if t.adversarial.attack_mode not in ('eval', 'train'):
    raise ValueError(f"config.train.adversarial.attack_mode={t.adversarial.attack_mode!r}: use 'eval' or 'train'")
  if t.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f'config.train.lr_schedule={t.lr_schedule!r}: use one of {LR_SCHEDULES}')
  if t.epochs <= 0:
    raise ValueError(f'config.train.epochs={t.epochs}: train for at least one epoch')


def learning_rate(t, epoch: int) -> float:
  """The weight learning rate of an epoch: cosine annealing (DARTS) or piecewise constant (step decay)."""
  if t.lr_schedule == 'cosine':
    return schedules.cosine_lr(t.lr, t.lr_min, t.epochs, epoch)
  return schedules.piecewise_lr(t.lr, t.lr_boundaries, t.lr_values, epoch)


# ------------------------------------------------------------------------------------------------
# Data, network and state.
# ------------------------------------------------------------------------------------------------
def splits(dataset: data.Dataset, holdout_fraction: float, seed: int) -> tuple[data.Split, data.Split]:
  """``(train, test)``: the dataset's test split, or with ``holdout_fraction > 0`` the training set split by
  ``data.search_split`` in a permutation drawn from ``seed``."""
  if holdout_fraction:
    return data.search_split(dataset, holdout_fraction, seed)
  if not len(dataset.test_labels):
    raise ValueError(f'the dataset {dataset.name!r} has no test split: set config.train.holdout_fraction '
                     '(e.g. 0.2) to hold out part of the training set, or data.test_path / data.test_split')
  return dataset.train, dataset.test


def make_network(genotype: genotypes.Genotype, t, dataset: data.Dataset) -> networks.EvalNetwork:
  """The evaluation network of ``config.train`` for a dataset (classes, normalisation inside the model)."""
  return networks.EvalNetwork(genotype, init_channels=t.init_channels, layers=t.layers,
                              num_classes=dataset.num_classes, auxiliary=t.auxiliary, mean=dataset.mean,
                              std=dataset.std, remat=t.get('remat', False),
                              compute_dtype=t.get('compute_dtype', 'float32'))


def network_spec(net: networks.EvalNetwork, image_shape) -> dict:
  """``network.json``: what ``load_trained`` needs besides the genotype (and ``jaxnas.report`` reads)."""
  return dict(init_channels=net.init_channels, layers=net.layers, num_classes=net.num_classes,
              input_shape=[int(s) for s in image_shape], auxiliary=net.auxiliary, mean=list(net.mean),
              std=list(net.std))


@flax.struct.dataclass
class TrainState:
  """Everything training carries from step to step (a pytree; checkpointed as a whole)."""
  params: object
  batch_stats: object
  opt_state: object
  step: jax.Array  # int32: number of completed steps.
  rng: jax.Array   # Base PRNG key; step t uses fold_in(rng, t).


@dataclasses.dataclass(frozen=True)
class Adversary:
  """How training examples are perturbed: PGD (Madry) or TRADES' KL attack (hashable, static)."""
  method: str = 'pgd'
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 7
  norm: str = 'linf'
  random_start: str = 'uniform'  # pgd_attack.STARTS
  attack_mode: str = 'eval'
  trades_beta: float = 6.0


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static description of a training step (a static argument of the jitted step)."""
  net: networks.EvalNetwork
  optim: bilevel.WeightOptim = bilevel.WeightOptim()
  augment: bilevel.Augment = bilevel.Augment()
  auxiliary_weight: float = 0.4
  adversary: Adversary | None = None
  grad_accum_steps: int = 1  # micro-batches per step (bilevel.accumulate_gradients)


def make_recipe(config, net: networks.EvalNetwork) -> Recipe:
  t, d, a = config.train, config.data, config.train.adversarial
  adversary = None
  if a.method != 'none':
    adversary = Adversary(method=a.method, eps=float(a.eps), step_size=float(a.step_size), steps=int(a.steps),
                          norm=a.norm, random_start=a.random_start, attack_mode=a.attack_mode,
                          trades_beta=float(a.trades_beta))
  return Recipe(net=net, optim=bilevel.WeightOptim(momentum=t.momentum, weight_decay=t.weight_decay,
                                                   grad_clip=t.grad_clip),
                augment=bilevel.Augment(crop_padding=d.crop_padding, flip=d.flip, cutout=d.cutout,
                                        fill=tuple(net.mean)),
                auxiliary_weight=float(t.auxiliary_weight) if net.auxiliary else 0.0, adversary=adversary,
                grad_accum_steps=search.grad_accum_steps(config))


def init_state(net: networks.EvalNetwork, rng, image_shape) -> TrainState:
  """Fresh weights (PyTorch init), the SGD momentum buffer, step 0 and the base key."""
  init_rng, base_rng = jax.random.split(rng)
  variables = net.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32))
  params = variables['params']
  return TrainState(params=params, batch_stats=variables['batch_stats'],
                    opt_state=bilevel.weight_optimizer(bilevel.WeightOptim(), 0.0).init(params),
                    step=jnp.zeros((), jnp.int32), rng=base_rng)


# Step metrics averaged over each epoch; their running sums are checkpointed, so a resumed epoch's means
# include the steps before the interruption.
EPOCH_MEANS = ('train/loss', 'train/acc', 'train/grad_norm')


def _payload(state: TrainState, steps_per_epoch: int, epoch_sums=None) -> dict:
  sums = np.zeros(len(EPOCH_MEANS)) if epoch_sums is None else np.asarray(epoch_sums, np.float64)
  return {'state': state, 'steps_per_epoch': steps_per_epoch, 'epoch_sums': sums}


def load_trained(workdir: str):
  """``(net, variables, step)`` of the latest checkpoint of a training workdir (``genotype.json``,
  ``network.json`` and ``checkpoints/``); ``variables`` are ``{'params', 'batch_stats'}``."""
  spec_path = workdir_lib.path(workdir, NETWORK)
  if not os.path.isfile(spec_path):
    raise FileNotFoundError(f'no {NETWORK} in {workdir!r}: pass the workdir of a training run (config.mode=train, '
                            "or a pipeline's WORKDIR/train), or a PyTorch state dict with its genotype and size")
  spec = workdir_lib.read_json(spec_path, NETWORK_FIX)
  net = networks.EvalNetwork(genotypes.load(workdir), init_channels=spec['init_channels'], layers=spec['layers'],
                             num_classes=spec['num_classes'], auxiliary=spec['auxiliary'],
                             mean=tuple(spec['mean']), std=tuple(spec['std']))
  target = _payload(init_state(net, jax.random.key(0), spec['input_shape']), 0)
  state = checkpoint.restore_checkpoint(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS), target)['state']
  return net, {'params': state.params, 'batch_stats': state.batch_stats}, int(state.step)


# ------------------------------------------------------------------------------------------------
# The jitted steps.
# ------------------------------------------------------------------------------------------------
def _key(state: TrainState, stream: int):
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), stream)


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _kl(p, logits):
  """Per-example ``KL(p || softmax(logits))``."""
  return jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-12)) - jax.nn.log_softmax(logits)), axis=-1)


def _attack(recipe: Recipe, variables, keys, x, y, drop_path_prob):
  """Adversarial training examples (``stop_gradient``): PGD on the cross-entropy, or TRADES' PGD on
  ``KL(f(x) || f(x'))``, against the network in the adversary's ``attack_mode``; ``keys(stream)`` gives the
  PRNG keys."""
  adv, net = recipe.adversary, recipe.net
  if adv.attack_mode == 'eval':
    logits_fn = lambda z: net.apply(variables, z)
  else:
    key = keys(_DROP_PATH_ADV)
    logits_fn = lambda z: net.apply(variables, z, train=True, rng=key, drop_path_prob=drop_path_prob)[0]
  loss = 'ce'
  if adv.method == 'trades':
    p_natural = jax.lax.stop_gradient(jax.nn.softmax(logits_fn(x)))
    loss = lambda logits, _: _kl(p_natural, logits)
  return pgd_attack.pgd(logits_fn, x, y, keys(_ATTACK), eps=adv.eps, step_size=adv.step_size,
                        steps=adv.steps, norm=adv.norm, loss=loss, random_start=adv.random_start)


@functools.partial(jax.jit, static_argnums=0)
def train_step(recipe: Recipe, state: TrainState, batch: dict, hparams: dict):
  """One SGD step on uint8 ``batch['image']`` / ``batch['label']``; ``hparams``: ``lr``, ``drop_path_prob``
  (traced: schedules never recompile). Loss: standard ``CE(f(x)) + w_aux CE(f_aux(x))``; PGD: the same on
  ``x'``; TRADES: ``CE(f(x)) + beta KL(f(x) || f(x')) + w_aux CE(f_aux(x))``. The batch is augmented whole;
  the attack, forward and backward pass run per micro-batch with ``recipe.grad_accum_steps > 1``
  (``bilevel.accumulate_gradients``). Returns ``(state, metrics)``."""
  TRACES['train_step'] += 1
  a = recipe.augment
  x = data.augment(_key(state, _AUGMENT), data.to_float(batch['image']), crop_padding=a.crop_padding,
                   flip=a.flip, cutout=a.cutout, cutout_fill=a.fill)
  p = hparams['drop_path_prob']
  adv = recipe.adversary
  pgd_only = adv is not None and adv.method == 'pgd'   # the loss sees only the adversarial examples

  def loss_fn(params, batch_stats, micro, index):
    keys = lambda stream: bilevel.micro_key(_key(state, stream), index)
    x, y = micro['image'], micro['label']
    forward = lambda stats, images, stream: recipe.net.apply(
        {'params': params, 'batch_stats': stats}, images, train=True, rng=keys(stream), drop_path_prob=p)
    x_adv = None
    if adv is not None:  # against the current weights, not differentiated
      x_adv = _attack(recipe, jax.lax.stop_gradient({'params': params, 'batch_stats': batch_stats}), keys, x, y, p)
    logits, logits_aux, stats = forward(batch_stats, x_adv if pgd_only else x, _DROP_PATH)
    loss = _ce(logits, y)
    if logits_aux is not None:
      loss += recipe.auxiliary_weight * _ce(logits_aux, y)
    if adv is not None and adv.method == 'trades':
      logits_adv, _, stats = forward(stats, x_adv, _DROP_PATH_ADV)
      loss += adv.trades_beta * jnp.mean(_kl(jax.nn.softmax(logits), logits_adv))
    return loss, (stats, {'acc': jnp.mean(jnp.argmax(logits, -1) == y)})

  loss, stats, micro_metrics, grads = bilevel.accumulate_gradients(
      loss_fn, state.params, state.batch_stats, {'image': x, 'label': batch['label']}, recipe.grad_accum_steps)
  updates, opt_state = bilevel.weight_optimizer(recipe.optim, hparams['lr']).update(grads, state.opt_state,
                                                                                     state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'train/loss': loss, 'train/acc': micro_metrics['acc'], 'train/grad_norm': bilevel.tree_norm(grads),
             'train/weights_finite': bilevel.all_finite(params)}
  return state.replace(params=params, batch_stats=stats, opt_state=opt_state, step=state.step + 1), metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _monitor_batch(net: networks.EvalNetwork, eps: float, steps: int, variables, images, labels, idx, key):
  """Inference-mode loss, clean correctness and PGD-``steps`` robustness (step ``eps / 4``) of a batch."""
  TRACES['monitor'] += 1
  logits_fn = lambda z: net.apply(variables, z)
  x = data.to_float(images)
  logits = logits_fn(x)
  clean = jnp.argmax(logits, -1) == labels
  x_adv = pgd_attack.pgd(logits_fn, x, labels, key, eps=eps, step_size=eps / 4, steps=steps, idx=idx)
  robust = clean & (jnp.argmax(logits_fn(x_adv), -1) == labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels), clean, robust


def monitor(net, t, variables, test: data.Split, seed: int) -> dict:
  """``test/loss``, ``test/clean_acc`` and ``test/pgd{steps}_acc`` on the first ``eval_examples`` test images
  (rounded down to a multiple of the batch, so the chunks share one compilation)."""
  n = min(t.eval_examples, len(test.labels))
  batch_size = min(t.eval_batch_size, n)
  n -= n % batch_size
  key = jax.random.key(seed)
  fn = lambda x, y, i: _monitor_batch(net, float(t.eval_eps), int(t.eval_steps), variables, x, y, i, key)
  loss, clean, robust = batching.run_batched(fn, [test.images[:n], test.labels[:n], np.arange(n)], batch_size)
  return {'test/loss': float(loss.mean()), 'test/clean_acc': float(clean.mean()),
          f'test/pgd{t.eval_steps}_acc': float(robust.mean())}


# ------------------------------------------------------------------------------------------------
# The training run.
# ------------------------------------------------------------------------------------------------
def _format(metrics: dict) -> str:
  return ' '.join(f'{k} {v:.4g}' for k, v in sorted(metrics.items()) if k.endswith(('loss', 'acc')))


def run(config, workdir: str) -> TrainState | None:
  """Trains (or resumes training) in ``workdir``; returns the final state (None when the run stopped early
  at ``config.train.max_steps``)."""
  _check_config(config)
  os.makedirs(search.output_dir(workdir), exist_ok=True)
  console = workdir_lib.Console(search.output_dir(workdir))
  try:
    return _train(config, workdir, console)
  except Exception as e:
    console.log(f'error: {type(e).__name__}: {e}', terminal=False)
    raise
  finally:
    console.close()


def _train(config, workdir: str, console: workdir_lib.Console):
  # ----------------------------------------------------------------------------
  # Config, data, network and mesh.
  # ----------------------------------------------------------------------------
  t = config.train
  genotype = genotypes.load(config.genotype)
  dataset = data.load(config.data)
  train, test = splits(dataset, t.holdout_fraction, config.seed)
  net = make_network(genotype, t, dataset)
  recipe = make_recipe(config, net)
  mesh = parallel.make_mesh(config.parallel.num_devices or None)
  per_device = config.parallel.per_device_batch_size
  batch_size = per_device * mesh.devices.size if per_device else t.batch_size
  parallel.check_batch_size(batch_size, mesh, recipe.grad_accum_steps)
  steps_per_epoch = data.num_batches(len(train.labels), batch_size)
  total_steps = t.epochs * steps_per_epoch
  train_seed, monitor_seed = (int(s) for s in np.random.SeedSequence(config.seed).generate_state(2))

  # ----------------------------------------------------------------------------
  # State: fresh, or restored from the latest checkpoint of the workdir.
  # ----------------------------------------------------------------------------
  ckpt_dir = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)   # shared by the processes of a run
  state = parallel.replicate(init_state(net, jax.random.key(config.seed), dataset.image_shape), mesh)
  last_checkpoint, epoch_sums = '', np.zeros(len(EPOCH_MEANS))
  if checkpoint.latest_step(ckpt_dir) is not None:
    previous = genotypes.load(workdir)
    if previous != genotype:
      raise ValueError(f'{workdir} holds a training run of another genotype ({workdir}/genotype.json): use a new '
                       'workdir for this one')
    workdir_lib.check_same_run(search.output_dir(workdir), config)
    payload = checkpoint.restore_checkpoint(ckpt_dir, _payload(state, steps_per_epoch))
    if payload['steps_per_epoch'] != steps_per_epoch:
      raise ValueError(f'the checkpoint in {ckpt_dir} was written with {payload["steps_per_epoch"]} steps per '
                       f'epoch, this config gives {steps_per_epoch}: use the original batch size and data, or a '
                       'new workdir')
    state, epoch_sums = payload['state'], payload['epoch_sums']
    last_checkpoint = os.path.join(ckpt_dir, str(int(state.step)))
  workdir = search.output_dir(workdir)   # process k > 0 writes its files into workdir/process_k
  workdir_lib.write_config(workdir, config)
  workdir_lib.save_genotype(workdir_lib.path(workdir, workdir_lib.GENOTYPE), genotype)
  with open(workdir_lib.path(workdir, NETWORK), 'w') as f:
    json.dump(network_spec(net, dataset.image_shape), f, indent=1)

  step = int(state.step)
  n_weights = analysis.count_params(state.params)
  adv = recipe.adversary
  console.log(f'{"resuming at" if step else "starting"} step {step}/{total_steps} in {workdir}')
  console.log(f'data {dataset.name}: {len(train.labels)} train / {len(test.labels)} test images '
              f'{dataset.image_shape}, {steps_per_epoch} steps per epoch of batch {batch_size}, {t.epochs} epochs')
  console.log(f'network {config.genotype}: C={net.init_channels}, {net.layers} cells, {n_weights / 1e6:.3f}M '
              f'weights (auxiliary head {"on" if net.auxiliary else "off"}); '
              + (f'{adv.method} training, eps {adv.eps:.4g}, {adv.steps} steps of {adv.step_size:.4g}'
                 if adv else 'standard training')
              + f'; {mesh.devices.size} {jax.default_backend()} device(s); the first step compiles (minutes)')

  writer = workdir_lib.MetricWriter(workdir, resume_step=step)

  def save(step_: int) -> str:
    checkpoint.save_checkpoint(ckpt_dir, step_, _payload(state, steps_per_epoch, epoch_sums),
                               keep=config.keep_checkpoints)
    return os.path.join(ckpt_dir, str(step_))

  # ----------------------------------------------------------------------------
  # The loop: one SGD step per batch; monitor and checkpoint at the end of every epoch.
  # ----------------------------------------------------------------------------
  nan_phase = schedules.Phase(lower=('loss',), upper=(), arch=False, project=False)
  stream, window = None, collections.defaultdict(list)
  run_step = parallel.step_runner(num_static=1)
  try:
    while step < total_steps:
      if t.max_steps and step >= t.max_steps:
        if last_checkpoint != os.path.join(ckpt_dir, str(step)):
          last_checkpoint = save(step)
        console.log(f'stopped at step {step} (config.train.max_steps); rerun without max_steps to continue')
        return None
      epoch, step_in_epoch = divmod(step, steps_per_epoch)
      if stream is None or step_in_epoch == 0:
        stream = data.epoch_batches(train.images, train.labels, batch_size, train_seed, epoch,
                                    start_step=step_in_epoch, process_index=jax.process_index(),
                                    process_count=jax.process_count())
      hparams = {'lr': np.float32(learning_rate(t, epoch)),
                 'drop_path_prob': np.float32(t.drop_path_prob * epoch / t.epochs)}
      b = next(stream)
      batch = parallel.global_batch({'image': b.images, 'label': b.labels}, mesh)
      new_state, metrics = run_step(train_step, recipe, state, batch, hparams)
      metrics = dict(jax.device_get(metrics), **{'train/lr': hparams['lr']})
      search.check_finite(metrics, step + 1, epoch + 1, nan_phase, last_checkpoint,
                          fix='lower config.train.lr or check the data')
      del metrics['train/weights_finite']
      state, step = new_state, step + 1
      for k, v in metrics.items():
        window[k].append(float(v))
      epoch_sums = epoch_sums + [metrics[k] for k in EPOCH_MEANS]
      console.rate(step)   # the clock starts after the first (compiling) step
      console.progress(step, total_steps, f'epoch {epoch + 1}/{t.epochs} ' + _format(metrics))
      if step % config.log_every_steps == 0 or step == total_steps:
        means = {k: float(np.mean(v)) for k, v in window.items()}
        writer.write(step, means, epoch=epoch)
        console.log(f'step {step}/{total_steps} (epoch {epoch + 1}/{t.epochs}) {_format(means)} | '
                    f'{console.eta(step, total_steps)}', terminal=not console.interactive)
        window.clear()

      if step % steps_per_epoch == 0:
        scalars = {f'epoch/{k}': float(v) / steps_per_epoch for k, v in zip(EPOCH_MEANS, epoch_sums)}
        scalars.update({'epoch/train/lr': float(hparams['lr']),
                        'epoch/drop_path_prob': float(hparams['drop_path_prob'])})
        epoch_sums = np.zeros(len(EPOCH_MEANS))
        if t.eval_every_epochs and ((epoch + 1) % t.eval_every_epochs == 0 or step == total_steps):
          variables = {'params': state.params, 'batch_stats': state.batch_stats}
          scalars.update({f'epoch/{k}': v for k, v in monitor(net, t, variables, test, monitor_seed).items()})
        writer.write(step, scalars, epoch=epoch)
        console.log(f'epoch {epoch + 1}/{t.epochs} done | ' + _format({k[6:]: v for k, v in scalars.items()}))
        last_checkpoint = save(step)
      elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        last_checkpoint = save(step)
  finally:
    writer.close()
  console.log(f'training done: {last_checkpoint or ckpt_dir}')
  return state
