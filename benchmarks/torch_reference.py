"""PyTorch reference models of the DARTS family, for benchmark ratios and parity tests.

Written from the documented semantics of the original code (see ``../shared/reference/NOTES.md``):
quark0/darts' search supernet (``model_search.Network``) and evaluation network (``model.NetworkCIFAR``),
and DSARA's evaluation network (fyqsama/ARNAS ``NetworkCIFAR_new``: three cell types, 1-2-2 widths).
Module names follow the originals, so ``state_dict()`` keys equal theirs (plus BatchNorm's
``num_batches_tracked``), and published checkpoints and the parity fixtures load directly. Tensors are
NCHW, as in PyTorch. Architecture parameters are passed to ``SearchNetwork.forward`` as a mapping
``{cell_type: (n_edges, n_ops)}`` (the jaxnas convention) rather than kept as module state.

One deliberate difference: the original auxiliary head starts with an in-place ReLU, which also rectifies
the output of the auxiliary cell; every later consumer of that tensor starts with a ReLU, so the results
agree unless the auxiliary cell is the last cell (``layers == 3``). Here the ReLU is out of place.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

DARTS_PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
                    'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
DSARA_PRIMITIVES = DARTS_PRIMITIVES[1:]
DARTS_LAYOUT = (('normal', 'normal', 'normal'), (1, 2, 4))
DSARA_LAYOUT = (('accurate', 'accurate', 'robust'), (1, 2, 2))


# ------------------------------------------------------------------------------------------------
# Operations (quark0/darts operations.py semantics).
# ------------------------------------------------------------------------------------------------
class OpBlock(nn.Module):
  """A module whose only child is ``op`` (so parameters are named ``op.<i>.weight``, as in the originals)."""

  def __init__(self, *layers: nn.Module):
    super().__init__()
    self.op = nn.Sequential(*layers)

  def forward(self, x):
    return self.op(x)


def relu_conv_bn(c_in, c_out, k, stride, padding, affine) -> nn.Module:
  return OpBlock(nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, padding, bias=False),
                   nn.BatchNorm2d(c_out, affine=affine))


def dil_conv(c_in, c_out, k, stride, padding, dilation, affine) -> nn.Module:
  """ReLU, depthwise k x k conv (dilated), 1x1 conv, BN."""
  return OpBlock(nn.ReLU(), nn.Conv2d(c_in, c_in, k, stride, padding, dilation, groups=c_in, bias=False),
                   nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=affine))


def sep_conv(c_in, c_out, k, stride, padding, affine) -> nn.Module:
  """Two stacked [ReLU, depthwise k x k, 1x1, BN]; the stride applies to the first depthwise conv only."""
  return OpBlock(nn.ReLU(), nn.Conv2d(c_in, c_in, k, stride, padding, groups=c_in, bias=False),
                   nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in, affine=affine),
                   nn.ReLU(), nn.Conv2d(c_in, c_in, k, 1, padding, groups=c_in, bias=False),
                   nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=affine))


class FactorizedReduce(nn.Module):
  """ReLU, two 1x1 stride-2 convs (c_out/2 each) on x and on x shifted by one pixel, concat, BN."""

  def __init__(self, c_in, c_out, affine):
    super().__init__()
    if c_out % 2:
      raise ValueError(f'FactorizedReduce needs an even number of output channels, got {c_out}')
    self.relu = nn.ReLU()
    self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
    self.bn = nn.BatchNorm2d(c_out, affine=affine)

  def forward(self, x):
    x = self.relu(x)
    return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class Zero(nn.Module):
  """The 'none' operation: zeros, strided like the other ops on the edge."""

  def __init__(self, stride):
    super().__init__()
    self.stride = stride

  def forward(self, x):
    return x[:, :, ::self.stride, ::self.stride] * 0.0


def make_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
  """One DARTS primitive on C channels."""
  if name == 'none':
    return Zero(stride)
  if name == 'max_pool_3x3':
    return nn.MaxPool2d(3, stride, 1)
  if name == 'avg_pool_3x3':
    return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
  if name == 'skip_connect':
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine)
  if name in ('sep_conv_3x3', 'sep_conv_5x5'):
    k = int(name[-1])
    return sep_conv(C, C, k, stride, k // 2, affine)
  if name in ('dil_conv_3x3', 'dil_conv_5x5'):
    k = int(name[-1])
    return dil_conv(C, C, k, stride, k - 1, 2, affine)
  raise ValueError(f'unknown operation {name!r}: choose one of {DARTS_PRIMITIVES}')


# ------------------------------------------------------------------------------------------------
# Network skeleton shared by the search and evaluation networks.
# ------------------------------------------------------------------------------------------------
def cell_plan(layers: int, C: int, stage_types: Sequence[str], widths: Sequence[int], multiplier: int = 4,
              stem_multiplier: int = 3) -> list[dict]:
  """Per cell: type, reduction flags and channel widths. Reductions at layers//3 and 2*layers//3; after k
  reductions cells have ``widths[k] * C`` channels and type ``stage_types[k]``."""
  c_pp = c_p = stem_multiplier * C
  plan, stage, reduction_prev = [], 0, False
  for i in range(layers):
    reduction = i in (layers // 3, 2 * layers // 3)
    stage += reduction
    c = widths[stage] * C
    plan.append(dict(cell_type='reduce' if reduction else stage_types[stage], reduction=reduction,
                     reduction_prev=reduction_prev, c_prev_prev=c_pp, c_prev=c_p, c=c))
    reduction_prev = reduction
    c_pp, c_p = c_p, multiplier * c
  return plan


def stem(c_in: int, c_out: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


def preprocessors(spec: dict, affine: bool) -> tuple[nn.Module, nn.Module]:
  if spec['reduction_prev']:
    p0 = FactorizedReduce(spec['c_prev_prev'], spec['c'], affine)
  else:
    p0 = relu_conv_bn(spec['c_prev_prev'], spec['c'], 1, 1, 0, affine)
  return p0, relu_conv_bn(spec['c_prev'], spec['c'], 1, 1, 0, affine)


# ------------------------------------------------------------------------------------------------
# Search supernet (model_search.Network).
# ------------------------------------------------------------------------------------------------
class MixedOp(nn.Module):
  """DARTS Eq. (2): sum over primitives of w_o * o(x); pool ops are followed by BN(affine=False)."""

  def __init__(self, C: int, stride: int, primitives: Sequence[str]):
    super().__init__()
    self._ops = nn.ModuleList()
    for name in primitives:
      op = make_op(name, C, stride, affine=False)
      if 'pool' in name:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)

  def forward(self, x, weights):
    return sum(w * op(x) for w, op in zip(weights, self._ops))


class SearchCell(nn.Module):
  """A search cell: node i sums mixed ops over all earlier states (DARTS Eq. 1); output concat of nodes."""

  def __init__(self, spec: dict, primitives: Sequence[str], steps: int, multiplier: int):
    super().__init__()
    self.reduction = spec['reduction']
    self.cell_type = spec['cell_type']
    self._steps, self._multiplier = steps, multiplier
    self.preprocess0, self.preprocess1 = preprocessors(spec, affine=False)
    self._ops = nn.ModuleList()
    for i in range(steps):
      for j in range(i + 2):
        stride = 2 if self.reduction and j < 2 else 1
        self._ops.append(MixedOp(spec['c'], stride, primitives))

  def forward(self, s0, s1, weights):
    states = [self.preprocess0(s0), self.preprocess1(s1)]
    edge = 0
    for _ in range(self._steps):
      node = sum(self._ops[edge + j](h, weights[edge + j]) for j, h in enumerate(states))
      edge += len(states)
      states.append(node)
    return torch.cat(states[-self._multiplier:], dim=1)


class SearchNetwork(nn.Module):
  """The DARTS search supernet; DSARA's with ``primitives=DSARA_PRIMITIVES`` and ``layout=DSARA_LAYOUT``.

  ``forward(x, alphas)`` with ``alphas = {cell_type: (n_edges, n_ops)}``; softmax over ops per edge.
  """

  def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8,
               primitives: Sequence[str] = DARTS_PRIMITIVES, layout=DARTS_LAYOUT, steps: int = 4,
               multiplier: int = 4, stem_multiplier: int = 3, in_channels: int = 3):
    super().__init__()
    self.primitives = tuple(primitives)
    self.steps = steps
    plan = cell_plan(layers, C, layout[0], layout[1], multiplier, stem_multiplier)
    self.cell_types = tuple(dict.fromkeys(s['cell_type'] for s in plan if not s['reduction'])) + ('reduce',)
    self.stem = stem(in_channels, stem_multiplier * C)
    self.cells = nn.ModuleList(SearchCell(s, self.primitives, steps, multiplier) for s in plan)
    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(multiplier * plan[-1]['c'], num_classes)

  @property
  def num_edges(self) -> int:
    return sum(i + 2 for i in range(self.steps))

  def new_alphas(self, generator: torch.Generator | None = None, dtype=torch.float32) -> dict:
    """alphas ~ 1e-3 * N(0, 1), one (n_edges, n_ops) tensor per cell type, requiring grad."""
    shape = (self.num_edges, len(self.primitives))
    return {t: (1e-3 * torch.randn(shape, generator=generator, dtype=dtype)).requires_grad_()
            for t in self.cell_types}

  def forward(self, x, alphas: Mapping[str, torch.Tensor]):
    weights = {t: F.softmax(a, dim=-1) for t, a in alphas.items()}
    s0 = s1 = self.stem(x)
    for cell in self.cells:
      s0, s1 = s1, cell(s0, s1, weights[cell.cell_type])
    return self.classifier(self.global_pooling(s1).flatten(1))


# ------------------------------------------------------------------------------------------------
# Evaluation network (NetworkCIFAR; DSARA's NetworkCIFAR_new).
# ------------------------------------------------------------------------------------------------
def drop_path(x, drop_prob: float):
  """Per-sample drop-path, kept samples scaled by 1/keep."""
  keep = 1.0 - drop_prob
  mask = torch.bernoulli(torch.full((x.shape[0], 1, 1, 1), keep, dtype=x.dtype, device=x.device))
  return x / keep * mask


class EvalCell(nn.Module):
  """Genotype cell: node i = op_a(state_a) + op_b(state_b); drop-path on non-identity ops in training."""

  def __init__(self, spec: dict, edges: Sequence, concat: Sequence[int]):
    super().__init__()
    self.reduction = spec['reduction']
    self.preprocess0, self.preprocess1 = preprocessors(spec, affine=True)
    self._indices = [int(idx) for _, idx in edges]
    self._concat = list(concat)
    self._ops = nn.ModuleList(make_op(name, spec['c'], 2 if self.reduction and idx < 2 else 1, True)
                              for name, idx in edges)

  def forward(self, s0, s1, drop_prob: float):
    states = [self.preprocess0(s0), self.preprocess1(s1)]
    for i in range(len(self._ops) // 2):
      node = 0
      for e in (2 * i, 2 * i + 1):
        h = self._ops[e](states[self._indices[e]])
        if self.training and drop_prob > 0 and not isinstance(self._ops[e], nn.Identity):
          h = drop_path(h, drop_prob)
        node = node + h
      states.append(node)
    return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
  """ReLU, AvgPool 5 stride 3 (8x8 -> 2x2), 1x1 conv 128, BN, ReLU, 2x2 conv 768, BN, ReLU, linear."""

  def __init__(self, C: int, num_classes: int):
    super().__init__()
    self.features = nn.Sequential(
        nn.ReLU(), nn.AvgPool2d(5, 3, 0, count_include_pad=False), nn.Conv2d(C, 128, 1, bias=False),
        nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
    self.classifier = nn.Linear(768, num_classes)

  def forward(self, x):
    return self.classifier(self.features(x).flatten(1))


def genotype_layout(genotype: Mapping):
  """DSARA's A-A-R / 1-2-2 layout for a genotype with accurate/robust cells, else DARTS'."""
  return DSARA_LAYOUT if 'accurate' in genotype or 'robust' in genotype else DARTS_LAYOUT


class EvalNetwork(nn.Module):
  """NetworkCIFAR from a genotype given as the published JSON dict (``{"normal": [[op, idx], ...],
  "normal_concat": [...], ...}``). ``forward`` returns ``(logits, logits_aux)``; ``logits_aux`` is None
  unless training with ``auxiliary``. Set ``drop_path_prob`` as in the original training loop."""

  def __init__(self, genotype: Mapping, C: int = 36, num_classes: int = 10, layers: int = 20,
               auxiliary: bool = False, layout=None, stem_multiplier: int = 3, in_channels: int = 3):
    super().__init__()
    layout = layout or genotype_layout(genotype)
    plan = cell_plan(layers, C, layout[0], layout[1], 4, stem_multiplier)
    self._aux_index = 2 * layers // 3
    self._auxiliary = auxiliary
    self.drop_path_prob = 0.0
    self.stem = stem(in_channels, stem_multiplier * C)
    self.cells = nn.ModuleList()
    for s in plan:
      t = s['cell_type']
      if t not in genotype:
        raise ValueError(f'genotype has no {t!r} cell for this layout: pass a layout matching its cells')
      self.cells.append(EvalCell(s, genotype[t], genotype.get(t + '_concat', range(2, 6))))
    if auxiliary:
      self.auxiliary_head = AuxiliaryHeadCIFAR(4 * plan[self._aux_index]['c'], num_classes)
    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(4 * plan[-1]['c'], num_classes)

  def forward(self, x):
    logits_aux = None
    s0 = s1 = self.stem(x)
    for i, cell in enumerate(self.cells):
      s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
      if i == self._aux_index and self._auxiliary and self.training:
        logits_aux = self.auxiliary_head(s1)
    return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


def count_params(model: nn.Module, exclude_prefix: str = 'auxiliary_head') -> int:
  """Number of parameters, excluding the auxiliary head (as the papers count)."""
  return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude_prefix))
