"""Evaluation networks built from a genotype (quark0/darts ``NetworkCIFAR``; DSARA's three-cell variant).

``EvalNetwork(genotype, init_channels, layers, num_classes, auxiliary)``:
  ``variables = net.init(rng, x)``;
  ``logits = net.apply(variables, x)`` (inference: running BN statistics, no drop-path, no aux head);
  ``logits, logits_aux, new_batch_stats = net.apply(variables, x, train=True, rng=key, drop_path_prob=p)``.
A DSARA genotype (cell types accurate / reduce / robust) gets A-A-R placement and 1-2-2 widths by default.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxnas import cells, genotypes, ops, parallel


def drop_path(x, drop_prob, rng):
  """Per-sample drop-path scaled by 1/keep (DARTS ``utils.drop_path``)."""
  keep = 1.0 - drop_prob
  mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def uses_drop_path(train: bool, drop_path_prob) -> bool:
  """Drop-path runs in train mode for a positive probability or a traced one (a ramp that does not recompile)."""
  return train and (isinstance(drop_path_prob, jax.Array) or drop_path_prob > 0)


def _stride(spec: cells.CellSpec, input_index: int) -> int:
  return 2 if spec.reduction and input_index < 2 else 1


def eval_cell_init(rng, spec: cells.CellSpec, edges):
  params, stats = cells.preprocess_init(rng, spec, affine=True)
  params['ops'], stats['ops'] = [], []
  for name, idx in edges:
    p, s = ops.OPS[name].init(rng, spec.c, _stride(spec, idx), True, False)
    params['ops'].append(p)
    stats['ops'].append(s)
  return params, stats


def eval_cell(spec: cells.CellSpec, params, stats, s0, s1, rng, *, edges, concat, train, drop_path_prob,
              depthwise):
  """NetworkCIFAR's cell: node i = op_a(state_a) + op_b(state_b); drop-path on non-identity ops."""
  s0, s1, new_stats = cells.preprocess(spec, params, stats, s0, s1, train)
  states, op_stats = [s0, s1], []
  for i in range(len(edges) // 2):
    node = 0.0
    for e in (2 * i, 2 * i + 1):
      name, idx = edges[e]
      stride = _stride(spec, idx)
      h, s = ops.OPS[name].apply(params['ops'][e], stats['ops'][e], states[idx], stride, train, depthwise)
      op_stats.append(s)
      if uses_drop_path(train, drop_path_prob) and not ops.is_identity(name, stride):
        h = drop_path(h, drop_path_prob, jax.random.fold_in(rng, e))
      node = node + h
    states.append(node)
  new_stats['ops'] = op_stats
  return jnp.concatenate([states[i] for i in concat], axis=-1), new_stats


def aux_head_init(rng, c_in, num_classes, spatial):
  """AuxiliaryHeadCIFAR: ReLU, AvgPool 5/3 (no pad), 1x1 conv 128, BN, ReLU, 2x2 conv 768, BN, ReLU, linear."""
  (b1, s1), (b2, s2) = ops.bn_init(128, True), ops.bn_init(768, True)
  pooled = (spatial - 5) // 3 + 1
  if pooled < 2:
    raise ValueError(f'the auxiliary head needs features of at least 8x8 after the second reduction (input '
                     f'>= 32x32), got {spatial}x{spatial}: use auxiliary=False for smaller inputs')
  flat = 768 * (pooled - 1) ** 2
  return ({'conv1': ops.conv_init(rng, 1, c_in, 128), 'bn1': b1, 'conv2': ops.conv_init(rng, 2, 128, 768),
           'bn2': b2, 'classifier': cells.linear_init(rng, flat, num_classes)}, {'bn1': s1, 'bn2': s2})


def aux_head(params, stats, x, train):
  y = ops.avg_pool(jax.nn.relu(x), 5, 3, 0)
  y, s1 = ops.batch_norm(params['bn1'], stats['bn1'], ops.conv2d(y, params['conv1']['kernel']), train)
  y = jax.nn.relu(y)
  y, s2 = ops.batch_norm(params['bn2'], stats['bn2'], ops.conv2d(y, params['conv2']['kernel']), train)
  y = jax.nn.relu(y)
  # Flatten in PyTorch's NCHW order so imported classifier weights line up.
  y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)
  return cells.linear(params['classifier'], y), {'bn1': s1, 'bn2': s2}


def default_layout(genotype: genotypes.Genotype):
  """(stage_types, widths) implied by a genotype's cell types: DSARA A-A-R 1-2-2, else DARTS."""
  if 'accurate' in genotype.cell_types or 'robust' in genotype.cell_types:
    return ('accurate', 'accurate', 'robust'), (1, 2, 2)
  return ('normal', 'normal', 'normal'), (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class EvalNetwork:
  """NetworkCIFAR from a genotype; the auxiliary head sits after cell ``2 * layers // 3``."""
  genotype: genotypes.Genotype
  init_channels: int = 36
  layers: int = 20
  num_classes: int = 10
  auxiliary: bool = False
  stem_multiplier: int = 3
  stage_types: tuple[str, str, str] | None = None
  widths: tuple[int, int, int] | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  depthwise: str = 'auto'
  remat: bool = False  # recompute cell activations in the backward pass (jax.checkpoint per cell)
  compute_dtype: str = 'float32'  # 'bfloat16': activations in bf16, float32 weights / BN statistics / logits

  def __post_init__(self):
    parallel.check_compute_dtype(self.compute_dtype)

  @property
  def plan(self) -> list[cells.CellSpec]:
    stage_types, widths = default_layout(self.genotype)
    plan = cells.cell_plan(self.layers, self.init_channels, self.stage_types or stage_types,
                           self.widths or widths, 4, self.stem_multiplier)
    missing = {spec.cell_type for spec in plan} - set(self.genotype.cell_types)
    if missing:
      raise ValueError(f'genotype has no {sorted(missing)} cell(s) for this layout; it has '
                       f'{self.genotype.cell_types}: pass stage_types matching the genotype')
    return plan

  @property
  def aux_index(self) -> int:
    return 2 * self.layers // 3

  def init(self, rng, x) -> dict:
    """Weights with PyTorch's default initialisation, seeded by ``rng``; ``x`` gives the input shape."""
    gen = ops.numpy_rng(rng)
    plan = self.plan
    stem_p, stem_s = cells.stem_init(gen, x.shape[-1], self.stem_multiplier * self.init_channels)
    cell_p, cell_s = [], []
    for spec in plan:
      p, s = eval_cell_init(gen, spec, self.genotype[spec.cell_type])
      cell_p.append(p)
      cell_s.append(s)
    c_out = 4 * plan[-1].c
    params = {'stem': stem_p, 'cells': cell_p, 'classifier': cells.linear_init(gen, c_out, self.num_classes)}
    stats = {'stem': stem_s, 'cells': cell_s}
    if self.auxiliary:
      spatial = x.shape[1] // 4  # after the two reductions before the auxiliary head
      params['aux_head'], stats['aux_head'] = aux_head_init(gen, 4 * plan[self.aux_index].c,
                                                            self.num_classes, spatial)
    return cells.as_variables(params, stats, x.dtype)

  def apply(self, variables, x, train: bool = False, rng=None, drop_path_prob: float = 0.0):
    """Inference returns ``logits``; train mode returns ``(logits, logits_aux or None, new_batch_stats)``.
    Computes in ``compute_dtype``; logits come back in ``x``'s dtype."""
    params, stats = parallel.compute_cast(self.compute_dtype, variables['params']), variables['batch_stats']
    if uses_drop_path(train, drop_path_prob) and rng is None:
      raise ValueError('drop-path needs a PRNG key: pass rng=... to apply(train=True)')
    out_dtype = x.dtype
    h = cells.normalize(parallel.compute_cast(self.compute_dtype, x), self.mean, self.std)
    h, stem_s = cells.stem_apply(params['stem'], stats['stem'], h, train)
    aux = {}

    def cell_fn(spec, p, s, s0, s1, key):
      return eval_cell(spec, p, s, s0, s1, key, edges=self.genotype[spec.cell_type],
                       concat=self.genotype.concat_of(spec.cell_type), train=train,
                       drop_path_prob=drop_path_prob, depthwise=self.depthwise)

    def on_output(index, s1):
      if index == self.aux_index and self.auxiliary and train:
        aux['logits'], aux['stats'] = aux_head(params['aux_head'], stats['aux_head'], s1, True)

    use_rng = rng if uses_drop_path(train, drop_path_prob) else None
    s1, cell_s, _ = cells.run_cells(cell_fn, self.plan, params['cells'], stats['cells'], h, h, use_rng,
                                    split_after=(self.aux_index,), on_output=on_output, remat=self.remat)
    logits = cells.classifier_head(params['classifier'], s1).astype(out_dtype)
    if not train:
      return logits
    new_stats = {'stem': stem_s, 'cells': cell_s}
    logits_aux = None
    if self.auxiliary:
      new_stats['aux_head'] = aux['stats']
      logits_aux = aux['logits'].astype(out_dtype)
    return logits, logits_aux, new_stats

  def logits_fn(self, variables):
    """``x -> logits`` in inference mode (running BN statistics, no drop-path, no aux head)."""
    fn = lambda x: self.apply(variables, x, train=False)
    fn.inference_mode = True
    return fn
