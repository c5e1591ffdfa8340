"""Distillation terms: one module per method, registered by name (see `base.py` for the contract).

`DistillationConfig(terms=[{"name": "sp", "weight": 3000.0}])` adds a term; `register_term` adds your own. The
methods register themselves when this package is imported. The built-in `logit`, `hidden` and `attention` terms
also have short forms, `DistillationConfig`'s `logit_*`, `hidden_*` and `attention_*` fields.
"""

from . import adversarial, at, attention, byot, crd, dkd, hidden, logit, minilm, pkd, pkt, rkd, sp, span_kd, uld  # noqa: F401  (each registers itself)
from .base import TERMS, Features, Needs, Term, TermBatch, TermSpec, logits_of, parse_term_specs, register_term
from .pooling import PooledFeatureOptions, pool, pooled

__all__ = [
    "TERMS",
    "Features",
    "Needs",
    "PooledFeatureOptions",
    "Term",
    "TermBatch",
    "TermSpec",
    "logits_of",
    "parse_term_specs",
    "pool",
    "pooled",
    "register_term",
]
