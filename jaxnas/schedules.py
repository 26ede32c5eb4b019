"""Schedules of the search as pure host-side functions of the position in the search.

Learning rates and the *phase* (which objectives act at each level, whether the architecture is updated and
projected) change with the epoch only. They are computed on the host and enter the jitted steps either as
traced scalars (learning rates: no recompilation when they change) or as a static ``Phase`` (the set of
active objectives: one compiled step per distinct phase, e.g. DSARA's two stages or AdvRush's warm-up).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence


def cosine_lr(base: float, final: float, epochs: int, epoch: int) -> float:
  """DARTS' weight learning rate: ``CosineAnnealingLR(T_max=epochs, eta_min=final)`` stepped once per epoch.

  ``lr(e) = final + (base - final) (1 + cos(pi e / epochs)) / 2``, constant within an epoch (quark0/darts
  ``train_search.py`` calls ``scheduler.step()`` at the start of every epoch).
  """
  if epochs <= 0:
    raise ValueError(f'epochs must be positive, got {epochs}')
  return final + (base - final) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def piecewise_lr(base: float, boundaries: Sequence[int], values: Sequence[float], epoch: int) -> float:
  """``base`` until the first boundary epoch, then ``values[i]`` from epoch ``boundaries[i]`` on
  (DSARA: Adam 3e-4 for stage 1, 5e-5 from epoch 20)."""
  if len(boundaries) != len(values):
    raise ValueError(f'lr boundaries {tuple(boundaries)} and values {tuple(values)} differ in length: '
                     'give one value per boundary epoch')
  if list(boundaries) != sorted(boundaries):
    raise ValueError(f'lr boundaries {tuple(boundaries)} must be increasing epochs')
  lr = base
  for boundary, value in zip(boundaries, values):
    if epoch >= boundary:
      lr = value
  return lr


def active(start_epoch: int, end_epoch: int, epoch: int) -> bool:
  """Whether something scheduled for epochs ``[start_epoch, end_epoch)`` acts at ``epoch`` (-1: no end)."""
  return epoch >= start_epoch and (end_epoch < 0 or epoch < end_epoch)


@dataclasses.dataclass(frozen=True)
class Phase:
  """The static structure of one search step: the labels of the active lower- and upper-level objectives,
  whether the architecture is updated, and whether alphas are projected onto the constraint set."""
  lower: tuple[str, ...]
  upper: tuple[str, ...]
  arch: bool
  project: bool

  @property
  def weights_only(self) -> 'Phase':
    """The part the weight step depends on: phases differing only in the upper level share its compilation."""
    return Phase(self.lower, (), False, False)


def phase(lower, upper, *, epoch: int, step_in_epoch: int, steps_per_epoch: int, arch_start_epoch: int = 0,
          project_from: float | None = None) -> Phase:
  """The phase at a position of the search.

  ``lower`` / ``upper`` are sequences of objective specs with ``label``, ``start_epoch`` and ``end_epoch``.
  The architecture is updated from ``arch_start_epoch`` on (RNAS: 15 warm-up epochs of weight training)
  when some upper objective is active; with ``project_from`` (a fraction of the epoch, RNAS: 0.5) alphas are
  projected in the steps ``step_in_epoch >= project_from * steps_per_epoch`` of every such epoch.
  """
  low = tuple(s.label for s in lower if active(s.start_epoch, s.end_epoch, epoch))
  up = tuple(s.label for s in upper if active(s.start_epoch, s.end_epoch, epoch))
  if not low:
    raise ValueError(f'no lower-level objective is active at epoch {epoch}: the weights need at least one '
                     '(check start_epoch / end_epoch of config.search.lower)')
  arch = epoch >= arch_start_epoch and bool(up)
  project = arch and project_from is not None and step_in_epoch >= project_from * steps_per_epoch
  return Phase(low, up if arch else (), arch, project)
