"""Homomorphic (CKKS) inference: plan compiler, parameters, evaluation engine, service.

Pure maths lives in :mod:`secure.he.plan` and :mod:`secure.he.params`; TenSEAL
is touched only by :mod:`secure.he.engine` (server side evaluation),
:mod:`secure.he.service` (validation of what callers send) and
:mod:`secure.client` (the caller's SDK, which alone ever holds a secret key).
"""

from __future__ import annotations

from secure.he.params import CKKSParams, max_secure_log_q, params_for_depth
from secure.he.plan import DenseLayer, HEPlan, compile_plan

__all__ = [
    "CKKSParams",
    "DenseLayer",
    "HEPlan",
    "compile_plan",
    "max_secure_log_q",
    "params_for_depth",
]
