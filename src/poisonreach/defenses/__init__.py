"""Defenses against indiscriminate poisoning (section 5.4, appendix C.8)."""

from .base import Filter, FilterResult, removal_count

__all__ = ["Filter", "FilterResult", "removal_count"]
