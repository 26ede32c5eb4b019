"""Inference-mode enforcement: attacks must see the model as evaluated (running BatchNorm statistics, no
drop-path, no auxiliary head).

``EvalNetwork.logits_fn(variables)`` and ``Supernet.logits_fn(...)`` always build inference-mode functions and
mark them with ``inference_mode = True``. The evaluation drivers (AutoAttack, ``evaluate_robustness``,
transfer) call ``check_inference_mode`` and refuse a function marked ``inference_mode = False``, a
``functools.partial(apply, ..., train=True)``, a function returning more than a logits array (e.g. flax's
``(logits, updates)`` with ``mutable=...`` or an auxiliary head), and a function whose output for one example
changes with the other examples of the batch (BatchNorm on batch statistics). The jitted attack cores
themselves do not check: adversarial training may legitimately attack a training-mode model.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def check_inference_mode(logits_fn, x) -> None:
  """Raises ``ValueError`` when ``logits_fn`` is (or behaves like) a model applied in training mode.

  Args:
    logits_fn: ``x -> logits [B, K]``.
    x: a few input images ``[B, ...]`` (only the first is used, for a two-example probe).
  """
  fix = 'build it with EvalNetwork.logits_fn(variables) or apply(variables, x, train=False)'
  if getattr(logits_fn, 'inference_mode', None) is False:
    raise ValueError(f'logits_fn is marked inference_mode=False (a training-mode model): {fix}')
  if isinstance(logits_fn, functools.partial) and (logits_fn.keywords.get('train') or 'mutable' in logits_fn.keywords):
    raise ValueError(f'logits_fn is a partial with train=True or mutable=...: {fix}')
  x0 = jnp.asarray(x[:1])
  probe_a = jnp.concatenate([x0, jnp.zeros_like(x0)])
  probe_b = jnp.concatenate([x0, jnp.ones_like(x0)])
  out_a = logits_fn(probe_a)
  if not isinstance(out_a, jax.Array) or out_a.ndim != 2 or out_a.shape[0] != 2:
    raise ValueError(f'logits_fn must return one logits array [B, K], got {jax.tree.map(jnp.shape, out_a)} '
                     f'(training-mode apply returns extra outputs): {fix}')
  out_b = logits_fn(probe_b)
  a, b = np.asarray(out_a[0], np.float64), np.asarray(out_b[0], np.float64)
  if np.max(np.abs(a - b)) > 1e-4 * (1.0 + np.max(np.abs(a))):
    raise ValueError('logits_fn output for one example depends on the other examples of the batch '
                     f'(BatchNorm with batch statistics, i.e. training mode): {fix}')
