"""Objectives of the robust search methods as pure functions over generic model/loss functions.

``curvature`` (AdvRush), ``jacobian`` (DSRNA-Jacobian), ``distortion`` (RNAS), ``ood`` and ``resources``
(E2RNAS). Each module documents the paper equation it implements.
"""
from jaxnas.objectives import curvature
from jaxnas.objectives import distortion
from jaxnas.objectives import jacobian
from jaxnas.objectives import ood
from jaxnas.objectives import resources
from jaxnas.objectives import certified  # registers 'certified_margin' (DSRNA-CB) with compose
