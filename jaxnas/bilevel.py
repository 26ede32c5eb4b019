"""The bi-level optimisation of differentiable NAS (DARTS, Liu et al. 2019, Eqs. 3-8) as pure jitted steps.

``SearchState`` holds weights, BatchNorm statistics, alphas, both optimizer states, the step and the base
PRNG key. ``weight_step`` (lower level: weights descend the weighted sum of the lower objectives on a train
batch) and ``arch_step`` (upper level: alphas descend the combined gradient of the upper objectives on a val
batch, first order or through one unrolled weight step) are jitted functions of a static ``Program`` (model,
objectives, optimizer settings), a static ``schedules.Phase``, the state, the batches and traced
hyper-parameters ``{'w_lr', 'a_lr'}``: learning-rate changes never recompile, and each phase compiles once.
``search_step`` is both as one program (the loop's step when the architecture is updated).

Gradient accumulation (``Program.grad_accum_steps`` = k > 1): the weight step runs its batch as k strided
micro-batches under ``lax.scan`` and makes one update with the mean gradient (``accumulate_gradients``); the
architecture step is not accumulated (its batch is processed whole).

Randomness is a pure function of the state: step ``t`` uses ``fold_in(state.rng, t)``, split into fixed
streams for augmentation and objectives, so a resumed search draws the same numbers as an uninterrupted one.

Optimizers (quark0/darts): weights SGD, momentum 0.9, weight decay 3e-4 added to the gradient (PyTorch
``SGD(weight_decay=...)``) after clipping the gradient norm to 5 (``clip_grad_norm_``); alphas Adam
(3e-4, betas (0.5, 0.999)) with weight decay 1e-3 added to the gradient (PyTorch ``Adam(weight_decay=...)``,
an L2 term, not AdamW).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from jaxnas import combine, parallel
from jaxnas import data as data_lib
from jaxnas.objectives import compose
from jaxnas.schedules import Phase

HVP_METHODS = ('finite_difference', 'exact')
TRACES: collections.Counter = collections.Counter()  # How often each step function was traced (tests).

# Stream ids folded into the step key.
_TRAIN_AUG, _VAL_AUG, _LOWER, _UPPER, _PROJECT = range(5)


@flax.struct.dataclass
class SearchState:
  """Everything a search carries from step to step (a pytree; checkpointed as a whole)."""
  params: Any
  batch_stats: Any
  alphas: Any
  w_opt_state: Any
  a_opt_state: Any
  step: jax.Array  # int32: number of completed weight steps.
  rng: jax.Array   # Base PRNG key; step t uses fold_in(rng, t).


@dataclasses.dataclass(frozen=True)
class WeightOptim:
  """SGD of the weights (DARTS: momentum 0.9, weight decay 3e-4, gradient norm clipped to 5; 0 = no clip)."""
  momentum: float = 0.9
  weight_decay: float = 3e-4
  grad_clip: float = 5.0
  nesterov: bool = False


@dataclasses.dataclass(frozen=True)
class ArchOptim:
  """Adam of the alphas and the architecture gradient (DARTS: Adam 3e-4, betas (0.5, 0.999), wd 1e-3).

  ``order`` 1 (gradient at the current weights) or 2 (through one unrolled weight step); ``hvp`` the
  second-order mixed Hessian-vector product, DARTS' ``'finite_difference'`` (radius ``fd_radius / ||v||``)
  or ``'exact'`` (``jax.jvp`` over ``jax.grad``). ``combiner`` and ``normalize`` as in
  ``compose.combine_gradients``.
  """
  b1: float = 0.5
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-3
  order: int = 1
  hvp: str = 'finite_difference'
  fd_radius: float = 0.01
  combiner: str = 'sum'
  normalize: bool = False


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation applied to train and val batches inside the steps (``data.augment``)."""
  crop_padding: int = 0
  flip: bool = False
  cutout: int = 0
  fill: tuple[float, ...] = (0.0,)


@dataclasses.dataclass(frozen=True)
class Projection:
  """Projection of alphas onto ``{a : objective(a) <= bound}`` (RNAS Eq. 9) by ``combine.project_constraint``."""
  objective: compose.ObjectiveSpec
  bound: float
  bisection_steps: int = 20
  inner_steps: int = 10


@dataclasses.dataclass(frozen=True)
class Program:
  """The static description of a search step (hashable: it is a static argument of the jitted steps)."""
  model: Any
  input_shape: tuple[int, ...]
  lower: tuple[compose.ObjectiveSpec, ...]
  upper: tuple[compose.ObjectiveSpec, ...]
  weights: WeightOptim = WeightOptim()
  arch: ArchOptim = ArchOptim()
  augment: Augment = Augment()
  projection: Projection | None = None
  grad_accum_steps: int = 1  # micro-batches per weight step (accumulate_gradients)

  def __post_init__(self):
    if self.grad_accum_steps < 1:
      raise ValueError(f'grad_accum_steps={self.grad_accum_steps}: use 1 (no accumulation) or more')
    if self.arch.order not in (1, 2):
      raise ValueError(f'arch.order={self.arch.order}: use 1 (first order) or 2 (unrolled, second order)')
    if self.arch.hvp not in HVP_METHODS:
      raise ValueError(f'arch.hvp={self.arch.hvp!r}: use one of {HVP_METHODS}')
    if self.arch.combiner not in compose.COMBINERS:
      raise ValueError(f'arch.combiner={self.arch.combiner!r}: use one of {compose.COMBINERS}')
    if self.arch.combiner == 'mgda' and len(self.upper) > 2:
      raise ValueError(f"arch.combiner='mgda' is the closed form for two objectives, the config has "
                       f"{len(self.upper)} upper objectives: use 'min_norm'")

  @property
  def lower_level(self) -> 'Program':
    """The part the weight step depends on: methods with the same lower level share its compilation."""
    return dataclasses.replace(self, upper=(), arch=ArchOptim(), projection=None)


# ------------------------------------------------------------------------------------------------
# Optimizers.
# ------------------------------------------------------------------------------------------------
def flat_leaves(tree):
  """All leaves of ``tree`` raveled into one vector: a reduction over it is one XLA kernel, where a
  reduction per leaf is one kernel per distinct leaf shape (a supernet has ~50; the DARTS weight step
  compiled 24.3 -> 20.1 s with its norms and finiteness check on one vector, benchmarks/RESULTS.md)."""
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
  return jnp.concatenate(leaves) if leaves else jnp.zeros((0,))


def tree_norm(tree):
  """The global L2 norm of a pytree (``optax.tree.norm``) over ``flat_leaves``."""
  return jnp.linalg.norm(flat_leaves(tree))


def all_finite(tree):
  """Whether every entry of every leaf is finite."""
  return jnp.all(jnp.isfinite(flat_leaves(tree)))


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
  """PyTorch's ``clip_grad_norm_``: scales by ``min(1, max_norm / (||g|| + 1e-6))``."""
  def update(updates, state, params=None):
    del params
    norm = tree_norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_optimizer(cfg: WeightOptim, lr) -> optax.GradientTransformation:
  """Clip, add ``weight_decay * w``, momentum ``buf = g + momentum * buf``, step ``-lr * buf`` (torch SGD)."""
  clip = clip_grad_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  return optax.chain(clip, optax.add_decayed_weights(cfg.weight_decay),
                     optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov), optax.scale(-lr))


def arch_optimizer(cfg: ArchOptim, lr) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (torch ``Adam(weight_decay=...)``)."""
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), optax.scale(-lr))


def momentum_buffer(w_opt_state):
  """The SGD momentum buffer (PyTorch's ``momentum_buffer``) inside the weight optimizer state."""
  return optax.tree_utils.tree_get(w_opt_state, 'trace')


def init_state(program: Program, rng, sample_images) -> SearchState:
  """Fresh weights (PyTorch init), alphas ``1e-3 N(0, 1)``, optimizer states and the base key."""
  init_rng, alpha_rng, base_rng = jax.random.split(rng, 3)
  variables = program.model.init(init_rng, data_lib.to_float(sample_images))
  alphas = program.model.init_alphas(alpha_rng)
  params = variables['params']
  return SearchState(params=params, batch_stats=variables['batch_stats'], alphas=alphas,
                     w_opt_state=weight_optimizer(program.weights, 0.0).init(params),
                     a_opt_state=arch_optimizer(program.arch, 0.0).init(alphas),
                     step=jnp.zeros((), jnp.int32), rng=base_rng)


# ------------------------------------------------------------------------------------------------
# Architecture gradients (DARTS Sec. 2.3).
# ------------------------------------------------------------------------------------------------
def _axpy(a, x, y):
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def unrolled_weights(lower_fn: Callable, params, alphas, buf, xi, momentum: float, weight_decay: float):
  """One simulated SGD step ``w' = w - xi (grad_w L_train(w, a) + momentum buf + wd w)`` (DARTS Eq. 7,
  with the momentum and weight decay of the real step, as quark0/darts ``_compute_unrolled_model``)."""
  g = jax.grad(lower_fn)(params, alphas)
  step = jax.tree.map(lambda gi, bi, wi: gi + momentum * bi + weight_decay * wi, g, buf, params)
  return _axpy(-xi, step, params)


def mixed_hvp(lower_fn: Callable, params, alphas, v, method: str = 'finite_difference', radius: float = 0.01):
  """``grad^2_{alpha, w} L_train(w, alpha) v`` at the current weights (DARTS Eq. 8).

  'finite_difference': ``[grad_a L(w + e v) - grad_a L(w - e v)] / (2 e)`` with ``e = radius / ||v||``
  (DARTS: radius 0.01); 'exact': forward-over-reverse ``jax.jvp`` of ``w -> grad_a L(w, a)`` along ``v``.
  """
  grad_alpha = lambda w: jax.grad(lower_fn, argnums=1)(w, alphas)
  if method == 'exact':
    return jax.jvp(grad_alpha, (params,), (v,))[1]
  if method != 'finite_difference':
    raise ValueError(f'unknown HVP method {method!r}: use one of {HVP_METHODS}')
  eps = radius / jnp.maximum(tree_norm(v), jnp.finfo(jnp.result_type(*jax.tree.leaves(v))).tiny)
  plus, minus = grad_alpha(_axpy(eps, v, params)), grad_alpha(_axpy(-eps, v, params))
  return jax.tree.map(lambda p, m: (p - m) / (2 * eps), plus, minus)


def unrolled_arch_grad(lower_fn: Callable, upper_fn: Callable, params, alphas, w_unrolled, xi,
                       method: str = 'finite_difference', radius: float = 0.01):
  """DARTS' second-order architecture gradient (Eq. 7-8):
  ``grad_a L_val(w', a) - xi grad^2_{a, w} L_train(w, a) grad_w' L_val(w', a)``.

  ``lower_fn(w, a) -> scalar``; ``upper_fn(w, a) -> (scalar, aux)``. With ``method='exact'`` this is the
  exact gradient of ``a -> L_val(w'(a), a)`` for the one-step unroll ``w'(a)`` of ``unrolled_weights``.
  Returns ``(grad, (value, aux))`` at ``w'``.
  """
  (value, aux), (g_w, g_a) = jax.value_and_grad(upper_fn, argnums=(0, 1), has_aux=True)(w_unrolled, alphas)
  hv = mixed_hvp(lower_fn, params, alphas, g_w, method, radius)
  return _axpy(-xi, hv, g_a), (value, aux)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation.
# ------------------------------------------------------------------------------------------------
def accumulate_gradients(loss_fn: Callable, params, batch_stats, batch: dict, k: int):
  """Mean loss and gradient of ``loss_fn`` over ``k`` micro-batches of ``batch`` (``parallel.micro_batches``)
  run one after another under ``lax.scan``: one compiled body, the activation memory of one micro-batch.

  ``loss_fn(params, batch_stats, batch, index) -> (loss, (new_batch_stats, metrics))``; ``index`` is the
  micro-batch's number (None when ``k == 1``: the whole batch, no scan). As in PyTorch with accumulation,
  BatchNorm normalises with each micro-batch's statistics and the running statistics are updated once per
  micro-batch, in order (a micro-batch sees the running statistics its predecessors left). 0-d entries of
  ``batch`` (the epoch) go to every micro-batch. Returns ``(loss, batch_stats, metrics, grads)``, loss,
  metrics and gradient averaged over the micro-batches.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (loss, (batch_stats, metrics)), grads = grad_fn(params, batch_stats, batch, None)
    return loss, batch_stats, metrics, grads
  shared = {name: v for name, v in batch.items() if jnp.ndim(v) == 0}
  split = parallel.micro_batches({name: v for name, v in batch.items() if jnp.ndim(v)}, k)

  def body(carry, xs):
    stats, grad_sum = carry
    index, micro = xs
    (loss, (stats, metrics)), grads = grad_fn(params, stats, {**micro, **shared}, index)
    return (stats, jax.tree.map(jnp.add, grad_sum, grads)), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (batch_stats, grad_sum), (losses, metrics) = jax.lax.scan(body, (batch_stats, zeros), (jnp.arange(k), split))
  return (jnp.mean(losses), batch_stats, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
          jax.tree.map(lambda g: g / k, grad_sum))


def micro_key(key, index):
  """The key of micro-batch ``index`` (the step's key itself without accumulation)."""
  return key if index is None else jax.random.fold_in(key, index)


# ------------------------------------------------------------------------------------------------
# The steps.
# ------------------------------------------------------------------------------------------------
def _step_key(state: SearchState, stream: int):
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), stream)


def _prepare(program: Program, batch: dict, key) -> dict:
  """uint8 images -> float [0, 1] with the program's augmentation; OoD images converted only."""
  a = program.augment
  out = dict(batch)
  out['image'] = data_lib.augment(key, data_lib.to_float(batch['image']), crop_padding=a.crop_padding,
                                  flip=a.flip, cutout=a.cutout, cutout_fill=a.fill)
  if 'ood_image' in batch:
    out['ood_image'] = data_lib.to_float(batch['ood_image'])
  return out


def _level(program: Program, specs: Sequence[compose.ObjectiveSpec], labels: Sequence[str]):
  """``(index, spec, fn)`` of the active objectives of a level, in config order."""
  return [(i, s, compose.build(s, program.model, program.input_shape))
          for i, s in enumerate(specs) if s.label in labels]


def _restructure(reference, tree):
  """``tree``'s leaves in the tree structure of ``reference`` (leaves matched by path). A model may return
  its statistics without empty entries (the supernet drops the stateless 'none' op's ``{}``); keeping the
  state's structure fixed keeps the jitted steps from retracing."""
  by_path = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  paths, treedef = jax.tree_util.tree_flatten_with_path(reference)
  return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p, _ in paths])


def _prefixed(prefix: str, metrics: dict) -> dict:
  return {f'{prefix}/{k}': v for k, v in metrics.items()}


def _upper_fn(group, batch_stats, batch, key):
  """``(w, a) -> (weighted loss, metrics)`` of a group of upper objectives on the val batch."""
  fn = compose.weighted(group)

  def upper(params, alphas):
    value, aux = fn(params, batch_stats, alphas, batch, key)
    return value, aux.metrics
  return upper


def _project(program: Program, state: SearchState, alphas, val: dict):
  """RNAS Eq. 9: the nearest alphas with ``F(alphas) <= bound`` at the current weights and val batch; an
  attacking F keeps the adversarial examples of the alphas it starts from (``compose.fix_adversarial``)."""
  p = program.projection
  fn = compose.build(p.objective, program.model, program.input_shape)
  key = _step_key(state, _PROJECT)
  val = compose.fix_adversarial(p.objective, program.model, program.input_shape, state.params,
                                state.batch_stats, alphas, val, key)
  constraint = lambda a: fn(state.params, state.batch_stats, a, val, key)[0]
  result = combine.project_constraint(alphas, constraint, p.bound, bisection_steps=p.bisection_steps,
                                      inner_steps=p.inner_steps)
  return result.alphas, result.value


@functools.partial(jax.jit, static_argnums=(0, 1))
def weight_step(program: Program, phase: Phase, state: SearchState, batch: dict, hparams: dict):
  """One lower-level SGD step on the weighted active lower objectives; increments ``state.step``.

  ``batch``: uint8 ``image``, ``label``, int32 ``epoch`` (and ``ood_image``); ``hparams['w_lr']`` the
  learning rate. The batch is augmented whole, then its gradient accumulated over
  ``program.grad_accum_steps`` micro-batches (``accumulate_gradients``). Returns ``(state, metrics)``.
  """
  TRACES['weight_step'] += 1
  data = _prepare(program, batch, _step_key(state, _TRAIN_AUG))
  lower = compose.weighted(_level(program, program.lower, phase.lower))
  key = _step_key(state, _LOWER)

  def loss_fn(params, batch_stats, micro, index):
    loss, aux = lower(params, batch_stats, state.alphas, micro, micro_key(key, index))
    return loss, (_restructure(state.batch_stats, aux.batch_stats), aux.metrics)

  loss, batch_stats, aux_metrics, grads = accumulate_gradients(loss_fn, state.params, state.batch_stats, data,
                                                               program.grad_accum_steps)
  opt = weight_optimizer(program.weights, hparams['w_lr'])
  updates, w_opt_state = opt.update(grads, state.w_opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state = state.replace(params=params, batch_stats=batch_stats, w_opt_state=w_opt_state, step=state.step + 1)
  metrics = {'train/loss': loss, 'train/grad_norm': tree_norm(grads),
             'train/param_norm': tree_norm(params), 'train/weights_finite': all_finite(params),
             **_prefixed('train', aux_metrics)}
  return state, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def arch_step(program: Program, phase: Phase, state: SearchState, train_batch: dict, val_batch: dict,
              hparams: dict):
  """One upper-level Adam step of the alphas on the combined gradient of the active upper objectives.

  First order: the gradient at the current weights. Second order: through the unrolled weight step on
  ``train_batch`` with ``xi = hparams['w_lr']`` (DARTS). Then the projection when ``phase.project``.
  ``hparams['a_lr']`` is Adam's learning rate. Leaves ``state.step`` and the running BN statistics unchanged
  (in the originals the validation forward passes also update them, a side effect of PyTorch's train mode;
  here only the weight step does). Returns ``(state, metrics)``.
  """
  TRACES['arch_step'] += 1
  cfg = program.arch
  val = _prepare(program, val_batch, _step_key(state, _VAL_AUG))
  upper_key = _step_key(state, _UPPER)
  bs = state.batch_stats
  active = _level(program, program.upper, phase.upper)
  # One upper function per gradient the combiner needs: the weighted sum, or every objective alone.
  groups = [active] if cfg.combiner == 'sum' else [[o] for o in active]
  uppers = [_upper_fn(g, bs, val, upper_key) for g in groups]
  if cfg.order == 1:
    results = [jax.value_and_grad(f, argnums=1, has_aux=True)(state.params, state.alphas) for f in uppers]
    results = [(g, (v, aux)) for (v, aux), g in results]
  else:
    train = _prepare(program, train_batch, _step_key(state, _TRAIN_AUG))
    lower = compose.weighted(_level(program, program.lower, phase.lower))
    lower_key = _step_key(state, _LOWER)
    lower_fn = lambda w, a: lower(w, bs, a, train, lower_key)[0]
    w_unrolled = unrolled_weights(lower_fn, state.params, state.alphas, momentum_buffer(state.w_opt_state),
                                  hparams['w_lr'], program.weights.momentum, program.weights.weight_decay)
    results = [unrolled_arch_grad(lower_fn, f, state.params, state.alphas, w_unrolled, hparams['w_lr'],
                                  cfg.hvp, cfg.fd_radius) for f in uppers]
  grads = [g for g, _ in results]
  direction, gammas = compose.combine_gradients(cfg.combiner, grads, cfg.normalize)
  opt = arch_optimizer(cfg, hparams['a_lr'])
  updates, a_opt_state = opt.update(direction, state.a_opt_state, state.alphas)
  alphas = optax.apply_updates(state.alphas, updates)
  metrics = {'val/loss': sum(value for _, (value, _) in results), 'arch/grad_norm': tree_norm(direction)}
  for _, (_, aux) in results:
    metrics.update(_prefixed('val', aux))
  if cfg.combiner != 'sum':
    metrics.update({f'arch/gamma_{s.label}': gammas[k] for k, (_, s, _) in enumerate(active)})
  if phase.project:
    alphas, constraint = _project(program, state, alphas, val)
    metrics['arch/constraint'] = constraint
  metrics['arch/alpha_norm'] = tree_norm(alphas)
  metrics['arch/alphas_finite'] = all_finite(alphas)
  return state.replace(alphas=alphas, a_opt_state=a_opt_state), metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def search_step(program: Program, phase: Phase, state: SearchState, train_batch: dict, val_batch: dict,
                hparams: dict):
  """One step of the search with an architecture update: ``arch_step``, then ``weight_step`` on the new
  alphas (quark0/darts ``train_search.py``), as one program. Both levels run the supernet's forward and
  backward passes on batches of one shape, so XLA compiles their kernels once (the DARTS search step, 8 cells:
  952 distinct kernels instead of 631 + 883 for the two steps apart; benchmarks/RESULTS.md). Returns
  ``(state, metrics)`` with both steps' metrics."""
  TRACES['search_step'] += 1
  state, metrics = arch_step.__wrapped__(program, phase, state, train_batch, val_batch, hparams)
  state, weight_metrics = weight_step.__wrapped__(program, phase, state, train_batch, hparams)
  return state, {**metrics, **weight_metrics}
