"""Defenses against indiscriminate poisoning (section 5.4, appendix C.8).

Filtering defenses (``filter(model, X, y) -> FilterResult``): Sever, Influence. Training defenses
(``train(model, X, y, ...)``): MaxUp, DeepPartitionAggregation (with certificates).
"""

from .base import Filter, FilterResult, removal_count
from .dpa import Certificate, DeepPartitionAggregation, Ensemble, certify
from .influence import Influence
from .maxup import MaxUp
from .sever import Sever

DEFENSES = {cls.name: cls for cls in (Sever, Influence, MaxUp, DeepPartitionAggregation)}

__all__ = ["DEFENSES", "Certificate", "DeepPartitionAggregation", "Ensemble", "certify", "Filter", "FilterResult", "Influence", "MaxUp", "Sever", "removal_count"]
