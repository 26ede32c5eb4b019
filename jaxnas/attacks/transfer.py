"""Transfer (black-box) attacks: adversarial examples crafted on a source model, scored on target models
(Papernot et al. 2016; the transfer tables of robust-NAS papers)."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import numpy as np

from jaxnas.attacks import batching
from jaxnas.attacks import inference
from jaxnas.attacks import pgd_attack


def transfer_matrix(models: Mapping[str, Callable], x, y, *, eps: float, norm: str = 'linf',
                    attack: Optional[Callable] = None, step_size: Optional[float] = None, steps: int = 20,
                    seed: int = 0, batch_size: int = 256) -> dict:
  """Accuracy of every target model on the examples crafted on every source model.

  Args:
    models: name -> inference-mode ``logits_fn``.
    x, y: images in [0, 1] and labels.
    eps, norm: threat model. attack: ``(logits_fn, x, y, key, idx) -> x_adv``; default PGD-``steps`` with
      step ``eps / 4`` (``step_size``) and a random start.
    seed, batch_size: randomness (per example, batch-size independent) and chunk size.

  Returns:
    dict with ``names``, ``clean`` (name -> clean accuracy) and ``accuracy[source][target]``; the diagonal
    is the white-box robust accuracy of each model under the attack.
  """
  x, y = np.asarray(x), np.asarray(y).astype(np.int32)
  if attack is None:
    step = eps / 4 if step_size is None else step_size
    attack = lambda f, xb, yb, key, idx: pgd_attack.pgd(f, xb, yb, key, eps=eps, step_size=step, steps=steps,
                                                      norm=norm, idx=idx)
  for name, fn in models.items():
    try:
      inference.check_inference_mode(fn, x)
    except ValueError as e:
      raise ValueError(f'model {name!r}: {e}') from None
  predictors = {name: batching.predictor(fn) for name, fn in models.items()}
  accuracy_on = lambda xs: {t: float(np.mean(batching.run_batched(p, [xs], batch_size) == y))
                            for t, p in predictors.items()}
  key = jax.random.PRNGKey(seed)
  idx = np.arange(len(x))
  matrix = {}
  for source, fn in models.items():
    craft = jax.jit(lambda xb, yb, ib, fn=fn: attack(fn, xb, yb, key, ib))
    matrix[source] = accuracy_on(batching.run_batched(craft, [x, y, idx], batch_size))
  return dict(names=list(models), clean=accuracy_on(x), accuracy=matrix)
