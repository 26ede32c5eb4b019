"""Robustness evaluation: clean and robust accuracy under a set of attacks, as a report dict, JSON and a
Markdown table (the rows of the robust-NAS papers: clean, FGSM, PGD-20, PGD-100, CW_inf, APGD-CE, AA).

A point counts as robust under an attack when it is classified correctly both clean and on the attack's
adversarial example. ``worst_case`` is the accuracy when every attack run is allowed to break a point.
Each attack draws per-example randomness from ``(seed, attack, example index)``: results do not depend on
``batch_size``. The model must be an inference-mode ``logits_fn`` (``EvalNetwork.logits_fn(variables)``).
"""
from __future__ import annotations

import functools
import json
import os
import time
from fractions import Fraction
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jaxnas.attacks import batching
from jaxnas.attacks import cw
from jaxnas.attacks import ensemble
from jaxnas.attacks import inference
from jaxnas.attacks import pgd_attack

# name -> (table label, norms it applies to); the order is the table's row order.
ATTACKS = {
    'fgsm': ('FGSM', ('linf', 'l2')),
    'pgd20': ('PGD-20', ('linf', 'l2')),
    'pgd100': ('PGD-100', ('linf', 'l2')),
    'cw_inf': ('CW∞', ('linf',)),
    'cw_l2': ('C&W-l2', ('l2',)),
    'apgd_ce': ('APGD-CE', ('linf', 'l2')),
    'apgd_t': ('APGD-T', ('linf', 'l2')),
    'fab_t': ('FAB-T', ('linf', 'l2')),
    'square': ('Square', ('linf', 'l2')),
    'aa': ('AutoAttack', ('linf', 'l2')),
}
DEFAULT_ATTACKS = ('fgsm', 'pgd20', 'pgd100', 'cw_inf', 'apgd_ce', 'aa')
_COMPONENT = {'apgd_ce': 'apgd-ce', 'apgd_t': 'apgd-t', 'fab_t': 'fab-t', 'square': 'square'}


_STEPS = {'pgd20': 20, 'pgd100': 100, 'cw_inf': 20}


@functools.lru_cache(maxsize=64)
def _white_box(kind: str, logits_fn, norm: str) -> Callable:
  """The jitted ``(x, y, key, idx, eps, step_size, steps) -> x_adv`` of 'fgsm', 'pgd', 'cw_inf' or 'cw_l2'
  (cached per model; PGD-20 and PGD-100 share one compilation)."""
  if kind == 'fgsm':
    fn = lambda x, y, key, idx, eps, step, steps: pgd_attack.fgsm(logits_fn, x, y, eps=eps, norm=norm)
  elif kind == 'pgd':
    fn = lambda x, y, key, idx, eps, step, steps: pgd_attack.pgd(logits_fn, x, y, key, eps=eps, step_size=step,
                                                                 steps=steps, norm=norm, idx=idx)
  elif kind == 'cw_inf':
    fn = lambda x, y, key, idx, eps, step, steps: cw.cw_linf(logits_fn, x, y, key, eps=eps, step_size=step,
                                                             steps=steps, kappa=50.0, idx=idx)
  else:
    fn = lambda x, y, key, idx, eps, step, steps: cw.cw_l2(logits_fn, x, y)
  return jax.jit(fn)


def evaluate_robustness(logits_fn, images, labels, *, attacks: Sequence[str] = DEFAULT_ATTACKS,
                        eps: float = 8 / 255, norm: str = 'linf', batch_size: int = 256, seed: int = 0,
                        step_size: Optional[float] = None, autoattack_options: Optional[dict] = None) -> dict:
  """Evaluates ``logits_fn`` on ``images [N, H, W, C]`` in [0, 1] with integer ``labels [N]``.

  Args:
    logits_fn: inference-mode ``x -> logits`` (refused if it behaves like a training-mode model).
    attacks: rows to run, from ``ATTACKS``: 'fgsm', 'pgd20', 'pgd100' (random start, step ``step_size``),
      'cw_inf' (PGD-20 on the C&W loss, kappa 50; l_inf), 'cw_l2' (C&W l_2, 9 binary steps x 100 Adam steps,
      broken when its minimum-norm adversarial is within ``eps``; l_2), 'apgd_ce', 'apgd_t', 'fab_t',
      'square' (AutoAttack's components alone, reference settings) and 'aa' (the standard ensemble).
    eps, norm: threat model ('linf' or 'l2'). step_size: PGD/CW_inf step, default ``eps / 4`` (2/255 at 8/255).
    batch_size: examples per jitted chunk (no effect on the results). seed: PRNG seed.
    autoattack_options: overrides of AutoAttack's ``n_iter``, ``n_target_classes``, ``n_queries`` (for quick
      runs; the defaults are the reference's standard settings), used by 'aa' and its components.

  Returns:
    A JSON-serialisable dict: ``eps``, ``norm``, ``n_examples``, ``seed``, ``step_size``,
    ``clean_accuracy``, ``attacks`` (name -> ``label``, ``robust_accuracy``, ``seconds``), ``autoattack``
    (when run: accuracy after each component, ``broken_by`` counts, sanity-check ``warnings``),
    ``worst_case_accuracy`` and ``per_example`` (labels, clean correctness, robustness per attack, the
    AutoAttack component that broke each point).
  """
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown:
    raise ValueError(f'unknown attack(s) {unknown}: choose from {list(ATTACKS)}')
  wrong_norm = [a for a in attacks if norm not in ATTACKS[a][1]]
  if wrong_norm:
    raise ValueError(f'attack(s) {wrong_norm} do not apply to norm {norm!r}: drop them or change the norm')
  x, y = np.asarray(images, np.float32), np.asarray(labels).astype(np.int32)
  if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
    raise ValueError(f'need images [N, H, W, C] and as many labels, got {x.shape} and {y.shape}')
  if x.min() < 0 or x.max() > 1:
    raise ValueError(f'images must lie in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]: divide uint8 by 255')
  inference.check_inference_mode(logits_fn, x)
  step_size = eps / 4 if step_size is None else step_size
  bad = set(autoattack_options or {}) - {'n_iter', 'n_target_classes', 'n_queries'}
  if bad:
    raise ValueError(f'unknown autoattack_options {sorted(bad)}: use n_iter, n_target_classes, n_queries')
  aa_options = dict(n_iter=100, n_target_classes=9, n_queries=5000)
  aa_options.update(autoattack_options or {})
  pred_fn = batching.predictor(logits_fn)
  clean = batching.run_batched(pred_fn, [x], batch_size) == y
  idx = np.arange(len(x))
  base_key = jax.random.PRNGKey(seed)
  rows, robust, report_aa, per_aa = {}, {}, None, None
  order = [a for a in ATTACKS if a in attacks]
  if 'aa' in order:   # first: its APGD-CE stage is exactly the standalone APGD-CE (same keys).
    order = ['aa'] + [a for a in order if a != 'aa']
  for name in order:
    start = time.perf_counter()
    if name == 'aa':
      aa = ensemble.autoattack(logits_fn, x, y, eps=eps, norm=norm, seed=seed, batch_size=batch_size,
                               **aa_options)
      robust[name] = aa['robust']
      per_aa = aa['broken_by'].tolist()
      names, counts = np.unique(aa['broken_by'][aa['broken_by'] != ''], return_counts=True)
      report_aa = dict(robust_accuracy=aa['robust_accuracy'], seconds=aa['seconds'], warnings=aa['warnings'],
                       broken_by={str(k): int(v) for k, v in zip(names, counts)})
    elif name == 'apgd_ce' and per_aa is not None:
      robust[name] = clean & ~np.isin(np.asarray(per_aa), ['apgd-ce'])
    elif name in _COMPONENT:
      todo = np.flatnonzero(clean)
      robust[name] = clean.copy()
      if len(todo):
        fn = ensemble.attack_fn(_COMPONENT[name], logits_fn, norm=norm, **aa_options, n_restarts=1)
        key = jax.random.fold_in(base_key, ensemble.ATTACKS.index(_COMPONENT[name]))
        adv = batching.run_batched(lambda a, b, c: fn(a, b, key, c, eps), [x[todo], y[todo], todo], batch_size)
        robust[name][todo] = batching.run_batched(pred_fn, [adv], batch_size) == y[todo]
    else:
      fn = _white_box('pgd' if name in ('pgd20', 'pgd100') else name, logits_fn, norm)
      key = jax.random.fold_in(base_key, 100 + list(ATTACKS).index(name))
      steps = _STEPS.get(name, 0)
      adv = batching.run_batched(lambda a, b, c: fn(a, b, key, c, eps, step_size, steps), [x, y, idx], batch_size)
      ok = batching.run_batched(pred_fn, [adv], batch_size) == y
      if name == 'cw_l2':
        dist = np.sqrt(np.sum((adv - x).reshape(len(x), -1) ** 2, axis=1))
        ok = ok | (dist > eps)
      robust[name] = clean & ok
    seconds = time.perf_counter() - start
    rows[name] = dict(label=ATTACKS[name][0], robust_accuracy=float(robust[name].mean()), seconds=seconds)

  worst = clean.copy()
  for r in robust.values():
    worst &= r
  report = dict(eps=float(eps), norm=norm, n_examples=int(len(x)), seed=int(seed), step_size=float(step_size),
                batch_size=int(batch_size), clean_accuracy=float(clean.mean()),
                attacks={a: rows[a] for a in ATTACKS if a in rows}, worst_case_accuracy=float(worst.mean()),
                per_example=dict(label=y.tolist(), clean_correct=clean.tolist(),
                                 robust={a: robust[a].tolist() for a in ATTACKS if a in robust}))
  if report_aa is not None:
    report['autoattack'] = dict(report_aa, options=aa_options)
    report['per_example']['autoattack_broken_by'] = per_aa
  return report


def format_eps(eps: float, norm: str) -> str:
  """``8/255 (0.0314)`` for l_inf radii that are multiples of 1/255 (or 1/510), else the number."""
  frac = Fraction(eps * 255).limit_denominator(2)
  if norm == 'linf' and abs(float(frac) - eps * 255) < 1e-6 and frac > 0:
    num = f'{frac.numerator}/{255 * frac.denominator}'
    return f'{num} ({eps:.4f})'
  return f'{eps:g}'


def format_markdown(report: dict) -> str:
  """The report as a Markdown table of accuracies (%), with the threat model stated."""
  lines = ['# Robustness report',
           '',
           f'Threat model: {report["norm"]}, eps = {format_eps(report["eps"], report["norm"])}; '
           f'{report["n_examples"]} examples, seed {report["seed"]}, PGD/CW step {report["step_size"]:.4g}.',
           '',
           '| evaluation | accuracy (%) | time (s) |',
           '| --- | ---: | ---: |',
           f'| Clean | {100 * report["clean_accuracy"]:.2f} | |']
  for row in report['attacks'].values():
    lines.append(f'| {row["label"]} | {100 * row["robust_accuracy"]:.2f} | {row["seconds"]:.1f} |')
  if len(report['attacks']) > 1:
    lines.append(f'| Worst case over all attacks | {100 * report["worst_case_accuracy"]:.2f} | |')
  aa = report.get('autoattack')
  if aa:
    lines += ['', '## AutoAttack (standard)', '', '| after | robust accuracy (%) |', '| --- | ---: |']
    lines += [f'| {k} | {100 * v:.2f} |' for k, v in aa['robust_accuracy'].items()]
    broken = ', '.join(f'{k}: {v}' for k, v in aa['broken_by'].items())
    lines += ['', f'Points broken by each component (clean = misclassified without attack): {broken or "none"}.']
    for warning in aa['warnings']:
      lines += ['', f'> Warning: {warning}']
  return '\n'.join(lines) + '\n'


def write_report(report: dict, workdir: str) -> tuple[str, str]:
  """Writes ``report.json`` and ``report.md`` into ``workdir`` (created if needed); returns both paths."""
  os.makedirs(workdir, exist_ok=True)
  json_path, md_path = os.path.join(workdir, 'report.json'), os.path.join(workdir, 'report.md')
  with open(json_path, 'w') as f:
    json.dump(report, f, indent=1)
  with open(md_path, 'w') as f:
    f.write(format_markdown(report))
  return json_path, md_path
