"""AutoAttack (Croce & Hein, ICML 2020): a parameter-free ensemble whose robust accuracy is the worst case
over its attacks, as in the reference implementation.

The 'standard' version runs APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR, 9 target classes),
FAB-T (9 targets) and Square (5000 queries, p_init 0.8), each only on the points still robust after the
previous ones. Every attack runs jitted on fixed-shape chunks; example ``i`` draws its randomness from
``(seed, attack, i)``, so results do not depend on ``batch_size`` (up to floating-point rounding, see
``batching``). A custom ``attacks`` list runs as the reference's version 'custom': APGD-CE, APGD-DLR and
untargeted FAB with 5 restarts (the reference also drops untargeted FAB to 1 restart for good once FAB-T has run
before it in the list, a side effect of FAB-T's settings; here it keeps 5), APGD-T, FAB-T and Square once.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Sequence

import jax
import numpy as np

from jaxnas.attacks import apgd_attack
from jaxnas.attacks import ball
from jaxnas.attacks import batching
from jaxnas.attacks import checks
from jaxnas.attacks import fab_attack
from jaxnas.attacks import inference
from jaxnas.attacks import square_attack

STANDARD = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
PLUS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
ATTACKS = ('apgd-ce', 'apgd-t', 'fab-t', 'square', 'apgd-dlr', 'fab')   # index = key stream of each attack


class AttackWarning(UserWarning):
  """An AutoAttack sanity check failed: the robustness estimate may be unreliable."""


@functools.lru_cache(maxsize=64)
def attack_fn(name: str, logits_fn, *, norm: str, n_iter: int = 100, n_target_classes: int = 9,
              n_queries: int = 5000, n_restarts: int = 1):
  """The jitted ``(x, y, key, idx, eps) -> x_adv`` of one AutoAttack component with the reference's settings.

  Cached per model and configuration (``eps`` is traced), so repeated evaluations compile once per shape.
  """
  table = {
      'apgd-ce': functools.partial(apgd_attack.apgd, loss='ce', n_iter=n_iter, n_restarts=n_restarts),
      'apgd-dlr': functools.partial(apgd_attack.apgd, loss='dlr', n_iter=n_iter, n_restarts=n_restarts),
      'apgd-t': functools.partial(apgd_attack.apgd_targeted, n_iter=n_iter, n_target_classes=n_target_classes),
      'fab-t': functools.partial(fab_attack.fab, targeted=True, n_iter=n_iter, n_target_classes=n_target_classes),
      'fab': functools.partial(fab_attack.fab, targeted=False, n_iter=n_iter, n_restarts=n_restarts),
      'square': functools.partial(square_attack.square, n_queries=n_queries),
  }
  if name not in table:
    raise ValueError(f'unknown AutoAttack component {name!r}: choose from {sorted(table)}')
  fn = table[name]
  return jax.jit(lambda x, y, key, idx, eps: fn(logits_fn, x, y, key, eps=eps, norm=norm, idx=idx))


def autoattack(logits_fn, x, y, *, eps: float, norm: str = 'linf', version: str = 'standard',
               attacks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 256, n_iter: int = 100,
               n_target_classes: int = 9, n_queries: int = 5000, n_restarts: int | None = None,
               run_checks: bool = True) -> dict:
  """Runs the AutoAttack ensemble on ``x [N, H, W, C]`` in [0, 1] with integer labels ``y [N]``.

  Args:
    logits_fn: inference-mode ``x -> logits`` (checked with ``inference.check_inference_mode``).
    eps, norm: the threat model ('linf' or 'l2').
    version: 'standard' (APGD-CE, APGD-T, FAB-T, Square) or 'plus' (adds APGD-DLR and untargeted FAB, 5
      restarts); ignored when ``attacks`` is given.
    attacks: a custom ordered subset of ``ATTACKS``.
    seed: the PRNG seed; batch_size: examples per jitted chunk (does not change results).
    n_iter, n_target_classes, n_queries: the reference's defaults (100, 9, 5000).
    n_restarts: restarts of APGD-CE, APGD-DLR and untargeted FAB; None: the reference's (1 in 'standard', 5 in
      'plus' and for a custom ``attacks`` list).
    run_checks: run the sanity checks (randomness and output range on the first two images, zero DLR
      gradients on the first ``batch_size``, number of classes, Square's success over the white-box attacks).

  Returns:
    dict with ``x_adv`` (numpy, the clean image where no attack succeeded), ``robust`` (bool ``[N]``),
    ``broken_by`` (per example: 'clean' if misclassified clean, the attack that broke it, or ''),
    ``clean_accuracy``, ``robust_accuracy`` (ordered: 'clean' then the accuracy after each attack),
    ``final_robust_accuracy``, ``seconds`` per attack, and ``warnings`` (failed sanity checks).
  """
  norm = ball.check_norm(norm)
  if n_restarts is None:
    n_restarts = 1 if attacks is None and version == 'standard' else 5
  if attacks is None:
    if version not in ('standard', 'plus'):
      raise ValueError(f"unknown AutoAttack version {version!r}: use 'standard', 'plus' or pass attacks=[...]")
    attacks = STANDARD if version == 'standard' else PLUS
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise ValueError(f'unknown AutoAttack component(s) {unknown}: choose from {list(ATTACKS)}')
  x, y = np.asarray(x), np.asarray(y).astype(np.int32)
  if len(x) != len(y) or len(x) == 0:
    raise ValueError(f'need as many labels as images (>0), got {len(x)} images and {len(y)} labels')
  if not np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 1:
    raise ValueError(f'images must be floats in [0, 1], got {x.dtype} in [{x.min():.3g}, {x.max():.3g}]: '
                     'divide uint8 images by 255')
  inference.check_inference_mode(logits_fn, x)

  found = []
  if run_checks:
    # The eager checks probe two images, the shape ``check_inference_mode`` compiled the model's ops for.
    probe, head = x[:2], x[:batch_size]
    n_classes = int(np.asarray(logits_fn(probe)).shape[1])
    found += [checks.check_randomized(logits_fn, probe, y[:2]), checks.check_range_output(logits_fn, probe),
              checks.check_n_classes(n_classes, attacks, n_target_classes, n_target_classes)]
    if n_classes >= 3:
      found.append(checks.check_zero_gradients(logits_fn, head, y[:batch_size]))

  pred_fn = batching.predictor(logits_fn)
  robust = batching.run_batched(pred_fn, [x], batch_size) == y
  broken_by = np.where(robust, '', 'clean').astype(object)
  x_adv = x.copy()
  accuracy = {'clean': float(robust.mean())}
  seconds = {}
  base_key = jax.random.PRNGKey(seed)
  for name in attacks:
    start = time.perf_counter()
    todo = np.flatnonzero(robust)
    if len(todo):
      fn = attack_fn(name, logits_fn, norm=norm, n_iter=n_iter, n_target_classes=n_target_classes,
                     n_queries=n_queries, n_restarts=n_restarts)
      key = jax.random.fold_in(base_key, ATTACKS.index(name))
      adv = batching.run_batched(lambda xb, yb, ib: fn(xb, yb, key, ib, eps), [x[todo], y[todo], todo],
                                 batch_size)
      broke = batching.run_batched(pred_fn, [adv], batch_size) != y[todo]
      hit = todo[broke]
      x_adv[hit], robust[hit], broken_by[hit] = adv[broke], False, name
    accuracy[name] = float(robust.mean())
    seconds[name] = time.perf_counter() - start

  if run_checks:
    found.append(checks.check_square_sr(accuracy))
  found = [m for m in found if m]
  for msg in found:
    warnings.warn(msg, AttackWarning, stacklevel=2)
  return dict(x_adv=x_adv, robust=robust, broken_by=broken_by.astype(str), clean_accuracy=accuracy['clean'],
              robust_accuracy=accuracy, final_robust_accuracy=float(robust.mean()), seconds=seconds,
              warnings=found)
