"""Objectives as configurable, composable pure functions, and the combiners of the upper level.

An *objective* is a pure function ``(params, batch_stats, alphas, batch, rng) -> (loss, Aux)`` built from the
search model (anything with ``Supernet.apply``'s signature) and a config entry ``{name, weight, label,
start_epoch, end_epoch, kwargs}`` by the builder registered under ``name``. ``Aux`` carries the running
BatchNorm statistics after the objective's train-mode forward passes (the weight step keeps them) and a dict
of scalar metrics. ``batch`` is a dict with float images ``'image'`` in [0, 1] (NHWC), integer ``'label'``,
the search ``'epoch'`` (a traced int32, for objectives with their own ramps) and, when the config has
``ood_data``, ``'ood_image'``.

Registry (``OBJECTIVES``): ``ce`` natural cross-entropy (DARTS); ``adv_ce`` cross-entropy on PGD / FGSM
examples (DSARA, RNAS, E2RNAS); ``curvature`` AdvRush's CURE regulariser; ``jacobian`` DSRNA's Jacobian norm;
``ood_kl`` E2RNAS' OoD KL-to-uniform; ``params`` / ``flops`` E2RNAS' expected resources; ``distortion`` RNAS'
feature distortion. ``register`` adds more.

Modes: ``mode='train'`` evaluates the network with batch statistics, as the originals do in ``model.train()``
during search; ``mode='eval'`` with the running statistics. Attacks inside objectives (``attack_mode``) run
on the train-mode network by default, as the DARTS-family adversarial search code does (its PGD runs while
the model is in ``train()``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import analysis, combine, genotypes, networks, ops
from jaxnas.attacks import pgd_attack
from jaxnas.objectives import curvature, distortion, jacobian, ood, resources

MODES = ('train', 'eval')
COMBINERS = ('sum', 'mgda', 'min_norm')


class Aux(NamedTuple):
  """What an objective returns besides its value."""
  batch_stats: Any   # Running BN statistics after the objective's train-mode forward passes.
  metrics: dict      # Scalar metrics, e.g. {'acc': ...}.


Objective = Callable[..., tuple[jax.Array, Aux]]


@dataclasses.dataclass(frozen=True)
class Context:
  """What a builder may use: the search model and the input shape (H, W, C)."""
  model: Any
  input_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """A hashable objective entry of one level of the config (``kwargs`` as sorted ``(key, value)`` pairs)."""
  name: str
  label: str
  weight: float = 1.0
  kwargs: tuple[tuple[str, Any], ...] = ()
  start_epoch: int = 0
  end_epoch: int = -1


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register(name: str):
  """Decorator registering ``builder(ctx: Context, **kwargs) -> Objective`` under ``name``."""
  def wrap(builder):
    OBJECTIVES[name] = builder
    return builder
  return wrap


# ------------------------------------------------------------------------------------------------
# Config entries -> specs -> objective functions.
# ------------------------------------------------------------------------------------------------
_RESERVED = ('loss', 'grad_norm')
_ENTRY_FIELDS = ('name', 'weight', 'label', 'start_epoch', 'end_epoch', 'kwargs')


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  return value


def _as_dict(entry) -> dict:
  return entry.to_dict() if hasattr(entry, 'to_dict') else dict(entry)


def spec_from_config(entry, where: str) -> ObjectiveSpec:
  """An ``ObjectiveSpec`` from a config entry; ``where`` names it in errors (e.g. 'config.search.upper[1]')."""
  entry = _as_dict(entry)
  unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
  if unknown:
    raise ValueError(f'{where} has unknown field {unknown[0]!r}: an objective entry has the fields '
                     f'{", ".join(_ENTRY_FIELDS)} (objective arguments go into kwargs)')
  name = entry.get('name', '')
  if name not in OBJECTIVES:
    raise ValueError(f'{where}: unknown objective {name!r}: choose one of {sorted(OBJECTIVES)}')
  kwargs = dict(entry.get('kwargs') or {})
  accepted = [p for p in inspect.signature(OBJECTIVES[name]).parameters if p != 'ctx']
  for key in kwargs:
    if key not in accepted:
      raise ValueError(f'{where}: objective {name!r} has no argument {key!r}: its kwargs are {accepted}')
  return ObjectiveSpec(name=name, label=str(entry.get('label') or name), weight=float(entry.get('weight', 1.0)),
                       kwargs=_hashable(kwargs), start_epoch=int(entry.get('start_epoch', 0)),
                       end_epoch=int(entry.get('end_epoch', -1)))


def specs_from_config(entries: Sequence, where: str) -> tuple[ObjectiveSpec, ...]:
  """The specs of one level; labels must be unique (they name metrics, gammas and errors)."""
  specs = tuple(spec_from_config(e, f'{where}[{i}]') for i, e in enumerate(entries))
  labels = [s.label for s in specs]
  for label in labels:
    if label in _RESERVED:
      raise ValueError(f'{where}: the label {label!r} is reserved for a metric: choose another label')
    if labels.count(label) > 1:
      raise ValueError(f'{where} has two objectives labelled {label!r}: give them distinct label fields')
  return specs


@functools.lru_cache(maxsize=None)
def build(spec: ObjectiveSpec, model, input_shape: tuple[int, ...]) -> Objective:
  """The objective function of a spec (cached: cost tables and closures are built once per model)."""
  ctx = Context(model, tuple(input_shape))
  return OBJECTIVES[spec.name](ctx, **dict(spec.kwargs))


def weighted(objectives: Sequence[tuple[int, ObjectiveSpec, Objective]]) -> Objective:
  """``sum_k weight_k * objective_k`` (the lower level, and the upper level's 'sum' combiner).

  ``objectives`` holds ``(index, spec, fn)``; objective ``k`` draws its randomness from
  ``fold_in(rng, index)``, so switching other objectives on or off does not change its random numbers.
  Running statistics are threaded through the objectives in order, as consecutive PyTorch forward passes
  would update them. Metrics: ``{label: value, label_metric: ...}``.
  """
  def total(params, batch_stats, alphas, batch, rng):
    value, metrics = 0.0, {}
    for index, spec, fn in objectives:
      loss, aux = fn(params, batch_stats, alphas, batch, jax.random.fold_in(rng, index))
      batch_stats = aux.batch_stats
      value = value + spec.weight * loss
      metrics[spec.label] = loss
      metrics.update({f'{spec.label}_{k}': v for k, v in aux.metrics.items()})
    return value, Aux(batch_stats, metrics)
  return total


def combine_gradients(combiner: str, grads: Sequence, normalize: bool = False):
  """Combines per-objective gradients: returns ``(direction, gammas [n])``.

  'sum': ``sum_i g_i``; 'mgda': DSARA Eq. 8's closed form for two objectives (the first gets gamma*);
  'min_norm': the min-norm point of the convex hull (E2RNAS Eq. 1), with ``normalize`` solving on
  l2-normalised gradients and applying the weights to the unnormalised ones (E2RNAS Eq. 10).
  One objective passes through with gamma 1.
  """
  n = len(grads)
  if combiner not in COMBINERS:
    raise ValueError(f'unknown combiner {combiner!r}: choose one of {COMBINERS}')
  if n == 1:
    return grads[0], jnp.ones((1,))
  if combiner == 'sum':
    return combine.weighted_sum(grads, jnp.ones((n,))), jnp.ones((n,))
  if combiner == 'mgda':
    if n != 2:
      raise ValueError(f"combiner 'mgda' is the closed form for two objectives, got {n}: use 'min_norm'")
    direction, gamma = combine.mgda_two(grads[0], grads[1])
    return direction, jnp.stack([gamma, 1.0 - gamma])
  gammas = combine.min_norm(grads, normalize=normalize)
  return combine.weighted_sum(grads, gammas), gammas


# ------------------------------------------------------------------------------------------------
# Helpers shared by the builders.
# ------------------------------------------------------------------------------------------------
def _check_mode(name: str, mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'{name}={mode!r}: use one of {MODES}')


def forward(model, params, batch_stats, alphas, x, mode: str, features: bool = False):
  """``(logits, batch_stats_after, features or None)``; eval mode leaves the statistics untouched."""
  variables = {'params': params, 'batch_stats': batch_stats}
  out = model.apply(variables, alphas, x, train=mode == 'train', return_features=features)
  if mode == 'train':
    return out[0], out[1], (out[2] if features else None)
  return (out[0], batch_stats, out[1]) if features else (out, batch_stats, None)


def _logits_fn(model, params, batch_stats, alphas, mode):
  return lambda x: forward(model, params, batch_stats, alphas, x, mode)[0]


def per_example_ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def _ramp(values: tuple[float, ...], index):
  """``values[clip(index, 0, len - 1)]`` for a traced index (a per-epoch ramp that then stays constant)."""
  table = jnp.asarray(values, float)  # float64 under jax_enable_x64
  return table[jnp.clip(index, 0, len(values) - 1)]


def _adversarial(ctx, params, batch_stats, alphas, batch, rng, *, attack, eps, step_size, steps, norm,
                 random_start, attack_mode):
  """Adversarial images (``stop_gradient``) against the network in ``attack_mode``; ``batch['adv_image']``
  when the caller fixed them (``fix_adversarial``)."""
  if 'adv_image' in batch:
    return batch['adv_image']
  logits_fn = _logits_fn(ctx.model, params, batch_stats, alphas, attack_mode)
  x, y = batch['image'], batch['label']
  if attack == 'fgsm' and not random_start:
    return pgd_attack.fgsm(logits_fn, x, y, eps=eps, norm=norm)
  return pgd_attack.pgd(logits_fn, x, y, rng, eps=eps, step_size=step_size, steps=steps, norm=norm,
                        random_start=random_start)


def _attack_args(attack, eps, step_size, steps, norm, random_start, attack_mode):
  """Validated attack settings; the default step is eps/4 for PGD (DSARA: 1/510 at eps 2/255) and
  1.25 eps for FGSM with a random start (E2RNAS, after Wong et al. 2020), eps without."""
  if attack not in ('pgd', 'fgsm'):
    raise ValueError(f"attack={attack!r}: use 'pgd' or 'fgsm'")
  _check_mode('attack_mode', attack_mode)
  if attack == 'fgsm':
    steps = 1
    step_size = step_size if step_size is not None else (1.25 * eps if random_start else eps)
  elif step_size is None:
    step_size = eps / 4.0
  return dict(attack=attack, eps=float(eps), step_size=float(step_size), steps=int(steps), norm=norm,
              random_start=bool(random_start), attack_mode=attack_mode)


def fix_adversarial(spec: ObjectiveSpec, model, input_shape: tuple[int, ...], params, batch_stats, alphas,
                    batch: dict, rng) -> dict:
  """``batch`` plus ``'adv_image'``: the examples that an attacking objective (``adv_ce``, ``distortion``)
  draws with ``rng`` at these weights and alphas, reused by its later evaluations at other alphas (RNAS'
  projection then solves Eq. 9 for a deterministic, smooth F). Other objectives get ``batch`` unchanged."""
  defaults = {k: v.default for k, v in inspect.signature(OBJECTIVES[spec.name]).parameters.items() if k != 'ctx'}
  kwargs = {**defaults, **dict(spec.kwargs)}
  if 'attack' not in kwargs:
    return batch
  args = _attack_args(*(kwargs[k] for k in ('attack', 'eps', 'step_size', 'steps', 'norm', 'random_start',
                                            'attack_mode')))
  ctx = Context(model, tuple(input_shape))
  return {**batch, 'adv_image': _adversarial(ctx, params, batch_stats, alphas, batch, rng, **args)}


# ------------------------------------------------------------------------------------------------
# The registered objectives.
# ------------------------------------------------------------------------------------------------
@register('ce')
def cross_entropy(ctx: Context, mode: str = 'train') -> Objective:
  """Natural cross-entropy, the training / validation loss of DARTS (Liu et al. 2019, Eq. 3-4)."""
  _check_mode('mode', mode)

  def objective(params, batch_stats, alphas, batch, rng):
    del rng
    logits, stats, _ = forward(ctx.model, params, batch_stats, alphas, batch['image'], mode)
    loss = jnp.mean(per_example_ce(logits, batch['label']))
    return loss, Aux(stats, {'acc': accuracy(logits, batch['label'])})
  return objective


@register('adv_ce')
def adversarial_cross_entropy(ctx: Context, attack: str = 'pgd', eps: float = 2 / 255,
                              step_size: float | None = None, steps: int = 7, norm: str = 'linf',
                              random_start: bool = True, attack_mode: str = 'train',
                              mode: str = 'train') -> Objective:
  """Cross-entropy on adversarial examples (Madry et al. 2018): DSARA's L^adv (PGD-7, eps 2/255, step 1/510),
  E2RNAS' FGSM objective (``attack='fgsm'``: one step of 1.25 eps from a uniform random start)."""
  _check_mode('mode', mode)
  attack_args = _attack_args(attack, eps, step_size, steps, norm, random_start, attack_mode)

  def objective(params, batch_stats, alphas, batch, rng):
    x_adv = _adversarial(ctx, params, batch_stats, alphas, batch, rng, **attack_args)
    logits, stats, _ = forward(ctx.model, params, batch_stats, alphas, x_adv, mode)
    loss = jnp.mean(per_example_ce(logits, batch['label']))
    return loss, Aux(stats, {'acc': accuracy(logits, batch['label'])})
  return objective


CURVATURE_ESTIMATORS = ('finite_difference', 'hvp', 'frobenius')


@register('curvature')
def curvature_regularizer(ctx: Context, h=1.5, direction_mode: str = 'eval', mode: str = 'eval',
                          estimator: str = 'finite_difference', n_samples: int = 1) -> Objective:
  """AdvRush's curvature regulariser (Eq. 10, CURE): ``mean_i ||grad_x l(x_i + z_i) - grad_x l(x_i)||``.

  The direction ``z = h sign(g) / ||sign(g)||`` comes from the network in ``direction_mode``, the gradient
  difference is taken in ``mode``: both inference mode by default, as in the original (its regulariser runs
  ``net.eval()``), where every example's input gradient is its own (``objectives.curvature``); in train mode
  the batch statistics couple the examples. ``h`` is a number or a per-epoch ramp indexed by the search epoch
  (the original's ``h_all[epoch]``: AdvRush's ``(0, 0.3, 0.6, 0.9, 1.2, 1.5)`` is over long before the
  regulariser starts at epoch 50, so every regularised epoch uses 1.5), in [0, 1] pixel units.
  ``estimator``: ``'finite_difference'`` (Eq. 10); ``'hvp'`` the exact ``mean_i ||H_i z_i||`` along the same
  ``z`` (a ``jax.jvp`` of the input gradient, Eq. 9 without the difference); ``'frobenius'`` the ideal term of
  Eq. 8 as Hutchinson's unbiased estimate of ``mean_i ||H_i||_F^2`` from ``n_samples`` Rademacher probes (no
  ``h``; for small inputs). Losses are per example (``objectives.curvature``): the original's mean-reduced
  loss gives ``1/B`` times this value, which the weight absorbs.
  """
  _check_mode('direction_mode', direction_mode)
  _check_mode('mode', mode)
  if estimator not in CURVATURE_ESTIMATORS:
    raise ValueError(f'curvature estimator={estimator!r}: use one of {CURVATURE_ESTIMATORS}')
  h_values = tuple(float(v) for v in h) if isinstance(h, (tuple, list)) else (float(h),)

  def objective(params, batch_stats, alphas, batch, rng):
    x, y = batch['image'], batch['label']
    loss_in = lambda m: (lambda x_, y_: per_example_ce(
        forward(ctx.model, params, batch_stats, alphas, x_, m)[0], y_))
    if estimator == 'frobenius':
      value = curvature.hessian_frobenius_hutchinson(loss_in(mode), x, y, rng, n_samples)
      return value, Aux(batch_stats, {})
    h_now = _ramp(h_values, batch['epoch'])
    z = curvature.cure_direction(loss_in(direction_mode), x, y, h_now)
    if estimator == 'hvp':
      value = curvature.hessian_vector_norm(loss_in(mode), x, y, z)
    else:
      g = curvature.input_grad(loss_in(mode), x, y)
      value = jnp.mean(curvature.per_example_norm(curvature.input_grad(loss_in(mode), x + z, y) - g))
    return value, Aux(batch_stats, {'h': h_now})
  return objective


@register('jacobian')
def jacobian_norm(ctx: Context, norm: str = 'l2', n_proj: int = 1, mode: str = 'eval') -> Objective:
  """DSRNA-Jacobian's input-Jacobian norm (Sec. 3.1.2, Hoffman et al. 2019 random projections): ``'l2'``
  estimates ``||J||_F^2``, ``'linf'`` the entrywise l1 norm bound of Eq. 15. In eval mode by default, where
  examples do not interact (a VJP then gives every example's projection at once)."""
  _check_mode('mode', mode)
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm={norm!r}: use 'l2' or 'linf'")

  def objective(params, batch_stats, alphas, batch, rng):
    logits_fn = _logits_fn(ctx.model, params, batch_stats, alphas, mode)
    if norm == 'l2':
      value = jacobian.jacobian_frobenius_sq(logits_fn, batch['image'], rng, n_proj)
    else:
      value = jacobian.jacobian_norm_bound(logits_fn, batch['image'], q=1, rng=rng, n_proj=n_proj)
    return value, Aux(batch_stats, {})
  return objective


@register('ood_kl')
def ood_kl(ctx: Context, mode: str = 'train') -> Objective:
  """E2RNAS' out-of-distribution objective (Eq. 3): ``KL(U || softmax(f(x_ood)))`` on ``batch['ood_image']``."""
  _check_mode('mode', mode)

  def objective(params, batch_stats, alphas, batch, rng):
    del rng
    if 'ood_image' not in batch:
      raise ValueError("objective 'ood_kl' needs out-of-distribution images: set config.ood_data "
                       "(a data config, e.g. source='tfds', name='svhn_cropped')")
    logits, stats, _ = forward(ctx.model, params, batch_stats, alphas, batch['ood_image'], mode)
    return ood.ood_kl_uniform(logits), Aux(stats, {})
  return objective


def derived_network(model, network: tuple[int, int], genotype: genotypes.Genotype) -> networks.EvalNetwork:
  """The evaluation network of ``network = (init_channels, layers)`` that a genotype of ``model``'s space
  derives (NetworkCIFAR; the supernet's cell placement and widths)."""
  if len(network) != 2:
    raise ValueError(f'network={tuple(network)}: give (init_channels, layers) of the derived network, or ()')
  if (model.steps, model.multiplier) != (4, 4):
    raise ValueError(f'the evaluation network has 4 nodes per cell, the supernet steps={model.steps}, '
                     f'multiplier={model.multiplier}: count costs on the supernet (network=())')
  return networks.EvalNetwork(genotype, init_channels=int(network[0]), layers=int(network[1]),
                              num_classes=model.num_classes, stem_multiplier=model.stem_multiplier,
                              stage_types=model.space.stage_types, widths=model.space.widths)


def _parameter_free_genotype(model) -> genotypes.Genotype:
  """A genotype with 3x3 max pooling (no parameters, no MACs) on every edge."""
  edges = (('max_pool_3x3', 0), ('max_pool_3x3', 1)) * model.steps
  concat = tuple(range(2, 2 + model.steps))
  return genotypes.Genotype(cells=tuple((t, edges) for t in model.space.cell_types),
                            concat=tuple((t, concat) for t in model.space.cell_types))


def op_costs(model, input_shape: tuple[int, ...], kind: str, network: tuple = ()) -> dict[str, np.ndarray]:
  """Per cell type, the ``[edges, ops]`` cost of every op on every edge, summed over the cells of that type.

  ``kind='params'``: the op's learned parameters; ``kind='flops'``: its multiply-accumulates for one example
  (``analysis.jaxpr_macs``, depthwise counted as grouped). ``model`` is a ``Supernet``; ``input_shape`` is
  (H, W, C). ``network=()``: the supernet's cells, ops as the supernet holds them (BN without affine
  parameters, BN after pools); ``network=(C, layers)``: the cells of the derived evaluation network
  (``derived_network``), ops as it holds them (affine BN, bare pools).
  """
  if kind not in ('params', 'flops'):
    raise ValueError(f"cost kind {kind!r}: use 'params' or 'flops'")
  primitives, edges = model.space.primitives, genotypes.edge_index(model.steps)
  costs = {t: np.zeros((len(edges), len(primitives))) for t in model.space.cell_types}
  size = tuple(input_shape[:2])
  plan, affine, pool_bn = model.plan, False, True
  if network:
    plan, affine, pool_bn = derived_network(model, network, _parameter_free_genotype(model)).plan, True, False

  @functools.lru_cache(maxsize=None)
  def cost(name, c, stride, hw):
    params, stats = ops.OPS[name].init(np.random.default_rng(0), c, stride, affine, pool_bn)
    if kind == 'params':
      return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    apply = lambda p, s, x: ops.OPS[name].apply(p, s, x, stride, False, 'grouped')[0]
    return analysis.jaxpr_macs(jax.make_jaxpr(apply)(params, stats, jnp.zeros((1,) + hw + (c,))))

  for spec in plan:
    for e, (_, j) in enumerate(edges):
      stride = 2 if spec.reduction and j < 2 else 1
      hw = size if (j < 2 or not spec.reduction) else (size[0] // 2, size[1] // 2)
      for o, name in enumerate(primitives):
        costs[spec.cell_type][e, o] += cost(name, spec.c, stride, hw)
    if spec.reduction:
      size = (size[0] // 2, size[1] // 2)
  return costs


def fixed_cost(model, input_shape: tuple[int, ...], kind: str, network: tuple) -> int:
  """The alpha-independent cost of the derived evaluation network (stem, cell preprocessing, classifier; no
  auxiliary head): the cost of that network with a parameter- and MAC-free op on every edge."""
  net = derived_network(model, network, _parameter_free_genotype(model))
  shape = (1,) + tuple(input_shape)
  return analysis.count_params(net, shape) if kind == 'params' else analysis.count_macs(net, shape)


def _resource(kind: str):
  def builder(ctx: Context, lower_bound: float = 0.0, scale: float = 1e-6, network: tuple = ()) -> Objective:
    network = tuple(network)
    costs = {t: jnp.asarray(c * scale, jnp.float32)
             for t, c in op_costs(ctx.model, ctx.input_shape, kind, network).items()}
    fixed = fixed_cost(ctx.model, ctx.input_shape, kind, network) * scale if network else 0.0

    def objective(params, batch_stats, alphas, batch, rng):
      del params, batch, rng
      used = {t: alphas[t] for t in costs}
      value = resources.resource_objective(used, costs, lower_bound - fixed)  # |fixed + N_hat - L|
      return value, Aux(batch_stats, {'expected': fixed + resources.expected_cost(used, costs)})
    return objective
  builder.__doc__ = (f'E2RNAS Eq. {5 if kind == "params" else 6}: ``|expected {kind} - lower_bound|`` with the '
                     f'softmax-weighted per-op {kind} of every edge, times ``scale`` (default: millions). '
                     '``network=()`` counts the ops of the supernet; ``network=(C, layers)`` the whole derived '
                     'evaluation network of that size (ops plus the alpha-independent stem, preprocessing and '
                     'classifier: one-hot alphas give its exact count).')
  return builder


register('params')(_resource('params'))
register('flops')(_resource('flops'))


@register('distortion')
def feature_distortion(ctx: Context, attack: str = 'pgd', eps: float = 2 / 255, step_size: float | None = None,
                       steps: int = 7, norm: str = 'linf', random_start: bool = True,
                       attack_mode: str = 'train', mode: str = 'train') -> Objective:
  """RNAS' network vulnerability (Eqs. 3-6): mean over cells of the KL between the clean and adversarial
  channel distributions of the cell outputs (``objectives.distortion``)."""
  _check_mode('mode', mode)
  attack_args = _attack_args(attack, eps, step_size, steps, norm, random_start, attack_mode)

  def objective(params, batch_stats, alphas, batch, rng):
    x_adv = _adversarial(ctx, params, batch_stats, alphas, batch, rng, **attack_args)
    _, stats, clean = forward(ctx.model, params, batch_stats, alphas, batch['image'], mode, features=True)
    _, _, adv = forward(ctx.model, params, batch_stats, alphas, x_adv, mode, features=True)
    return distortion.feature_distortion(clean, adv), Aux(stats, {})
  return objective
