"""Defenses against indiscriminate poisoning (section 5.4, appendix C.8)."""

from .base import Filter, FilterResult, removal_count
from .maxup import MaxUp

DEFENSES = {cls.name: cls for cls in (MaxUp,)}

__all__ = ["DEFENSES", "Filter", "FilterResult", "MaxUp", "removal_count"]
