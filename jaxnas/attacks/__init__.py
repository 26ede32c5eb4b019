"""Adversarial attacks and robustness evaluation on inference-mode ``logits_fn(x) -> logits`` (NHWC in [0, 1]).

Jitted, batched cores (``lax`` loops, per-example randomness from ``(key, example index)``): ``fgsm``,
``pgd`` (also used by adversarial training), ``cw_linf``, ``cw_l2``, ``apgd``, ``apgd_targeted``, ``fab``,
``square``. Host drivers: ``autoattack`` (the standard ensemble and its sanity checks) and
``transfer_matrix``; ``check_inference_mode`` refuses training-mode models.
"""
from jaxnas.attacks.apgd_attack import apgd, apgd_targeted
from jaxnas.attacks.ensemble import AttackWarning, autoattack
from jaxnas.attacks.cw import cw_l2, cw_linf
from jaxnas.attacks.fab_attack import fab
from jaxnas.attacks.inference import check_inference_mode
from jaxnas.attacks.losses import cross_entropy, cw_loss, dlr_loss, dlr_loss_targeted, margin
from jaxnas.attacks.pgd_attack import fgsm, pgd
from jaxnas.attacks.square_attack import square
from jaxnas.attacks.transfer import transfer_matrix

__all__ = [
    'AttackWarning', 'apgd', 'apgd_targeted', 'autoattack', 'check_inference_mode', 'cross_entropy', 'cw_l2',
    'cw_linf', 'cw_loss', 'dlr_loss', 'dlr_loss_targeted', 'fab', 'fgsm', 'margin', 'pgd', 'square',
    'transfer_matrix',
]
