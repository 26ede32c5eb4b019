"""DSRNA-CB's robustness metric (Hosseini et al. 2021, Sec. 3.1.1): the certified lower bound of the margins.

``R = mean_i min_{j != y_i} LB_ij(eps)`` where ``LB_ij`` lower-bounds ``f_y(x') - f_j(x')`` over the ball of
radius ``eps`` around the validation image ``x_i`` (intersected with the [0, 1] pixel box). The bounds are those
of ``jaxnas.certify`` (linear relaxations of every ReLU / max composed through the supernet, whose mixed
operation is the softmax(alpha)-weighted sum of the ops' bounds: the paper's "alpha L, alpha U" composition), so
``R`` is a differentiable function of the alphas and the weights; ``R > 0`` for an example certifies it.

The objective's value is ``-R`` (objectives are minimised): with weight ``gamma`` next to ``ce`` in the upper
level it gives DSRNA's Eq. 16, ``L_val - gamma R``.

eps: the paper initialises it at 0.03 and "linearly increases or decreases it based on the global difference
between the certified upper and lower bounds". Objectives carry no state between steps, so here every step
starts from ``eps`` and makes one linear correction: the bounds' width grows linearly in eps for small eps, so
``eps' = eps * target_gap / gap(eps)`` (clipped to ``[eps / max_scale, eps * max_scale]``), where ``gap`` is the
batch mean of ``UB - LB`` of the margins at ``eps`` (no gradient), brings the width to ``target_gap`` logits:
the metric stays informative (neither the clean margin nor a vacuous bound) as the network's gain changes.
``adapt_eps=False`` keeps ``eps`` fixed.

The bounds need a network that treats examples independently: the supernet runs in inference mode (running
BatchNorm statistics, kept current by the weight steps), ``compose.forward(..., 'eval')``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnas import certify
from jaxnas.certify import domain, propagation
from jaxnas.objectives import compose


def margin_gap(logits_fn, x, y, eps, norm: str, method: str, box) -> jax.Array:
  """The batch mean of ``UB - LB`` of the margins ``f_y - f_j`` over the ball of radius ``eps``."""
  num_classes = jax.eval_shape(logits_fn, x[:1]).shape[-1]
  lower, upper = certify.bounds(logits_fn, x, eps, norm, method, C=certify.margin_spec(y, num_classes), box=box)
  return jnp.mean(upper - lower)


def adapted_eps(gap, eps: float, target_gap: float, max_scale: float):
  """One linear correction of ``eps`` towards the width ``target_gap``: ``eps * target_gap / gap``, clipped."""
  scale = jnp.clip(target_gap / jnp.maximum(gap, jnp.finfo(jnp.result_type(gap)).tiny), 1 / max_scale, max_scale)
  return eps * scale


@compose.register('certified_margin')
def certified_margin(ctx: compose.Context, eps: float = 0.03, norm: str = 'linf', method: str = 'crown-ibp',
                     adapt_eps: bool = True, target_gap: float = 1.0, max_scale: float = 10.0, box: bool = True,
                     examples: int = 0) -> compose.Objective:
  """DSRNA-CB: ``-mean_i min_j LB_ij`` of the supernet in inference mode (see the module docstring).

  ``method``: 'crown-ibp' (CROWN for the margins, IBP for the intermediate bounds: one backward pass, the
  affordable linear bound for a supernet), 'ibp', or 'crown' (full CROWN; small networks only). ``box``: clip
  the ball to the [0, 1] pixel range. ``examples``: bound only the first ``examples`` images of the batch (0:
  all; the memory of the bounds grows with it, see ``configs/dsrna_cb.py``).
  Metrics: ``margin`` (R), ``eps`` (the radius used), ``certified`` (fraction of examples with R_i > 0).
  """
  domain.check_norm(norm)
  propagation.check_method(method)
  if eps <= 0 or target_gap <= 0 or max_scale < 1:
    raise ValueError(f'certified_margin needs eps > 0, target_gap > 0 and max_scale >= 1, got eps={eps}, '
                     f'target_gap={target_gap}, max_scale={max_scale}')
  pixel_box = (0.0, 1.0) if box else None

  def objective(params, batch_stats, alphas, batch, rng):
    del rng
    x, y = batch['image'], batch['label']
    if examples:
      x, y = x[:examples], y[:examples]
    logits_fn = lambda p, a, xb: compose.forward(ctx.model, p, batch_stats, a, xb, 'eval')[0]
    eps_now = jnp.asarray(eps, x.dtype)
    if adapt_eps:
      frozen = jax.tree.map(jax.lax.stop_gradient, (params, alphas))
      gap = margin_gap(lambda xb: logits_fn(*frozen, xb), x, y, eps_now, norm, method, pixel_box)
      eps_now = adapted_eps(gap, eps_now, target_gap, max_scale)
    lower = certify.margin_lower_bounds(lambda xb: logits_fn(params, alphas, xb), x, y, eps_now, norm, method,
                                        box=pixel_box)
    margin = jnp.min(lower, axis=1)
    value = -jnp.mean(margin)
    return value, compose.Aux(batch_stats, {'margin': -value, 'eps': eps_now,
                                            'certified': jnp.mean((margin > 0).astype(value.dtype))})
  return objective
