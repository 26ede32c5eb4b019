"""Certified robustness: IBP and CROWN bounds of JAX models, certified margins and radii (DSRNA, CNN-Cert).

Models are plain functions ``x -> logits`` (or ``(params, x) -> logits``); they are interpreted from their jaxpr,
so any network built from convolutions, dense layers, BatchNorm in inference mode, ReLU, sums, concatenation,
average / max pooling and alpha-weighted mixtures of operations is supported without writing bound code.
"""
from jaxnas.certify.domain import NORMS
from jaxnas.certify.propagation import bounds
from jaxnas.certify.propagation import crown_bounds
from jaxnas.certify.propagation import ibp_bounds
from jaxnas.certify.propagation import margin_lower_bounds
from jaxnas.certify.propagation import margin_spec
from jaxnas.certify.propagation import METHODS
from jaxnas.certify.radius import certified_radii_report
from jaxnas.certify.radius import certified_radius

__all__ = ['bounds', 'certified_radii_report', 'certified_radius', 'crown_bounds', 'ibp_bounds',
           'margin_lower_bounds', 'margin_spec', 'METHODS', 'NORMS']
