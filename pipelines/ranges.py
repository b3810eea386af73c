"""Allowed ranges of numbers, written as intervals: one helper for config fields, CLI options and library arguments.

A range is interval notation: ``"[1, inf)"`` (at least 1), ``"(0, inf)"`` (positive), ``"[0, 1)"``, ``"[1, 100]"``.
A bound of ``inf`` is never included, so ``"(0, inf)"`` also refuses infinity; NaN is outside every range. The
error names the key (a config key such as ``train.lr`` or an option such as ``--shard-rows``) and the range.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?(?:inf|[0-9.e+-]+))\s*,\s*(-?(?:inf|[0-9.e+-]+))\s*([\])])\s*$")


@lru_cache(maxsize=None)
def _parse(spec: str) -> tuple[float, bool, float, bool]:
    m = _INTERVAL.match(spec)
    if not m:
        raise ValueError(f"bad range {spec!r}: write it like '[0, 1)' or '(0, inf)'")
    lo, hi = float(m[2]), float(m[3])
    return lo, m[1] == "[" and math.isfinite(lo), hi, m[4] == "]" and math.isfinite(hi)


def contains(spec: str, value: float) -> bool:
    """Whether ``value`` lies in the interval ``spec``."""
    lo, lo_closed, hi, hi_closed = _parse(spec)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    above = value >= lo if lo_closed else value > lo
    below = value <= hi if hi_closed else value < hi
    return above and below


def check(where: str, value: float, spec: str) -> float:
    """``value`` if it lies in ``spec``, else a ``ValueError`` naming ``where`` and the allowed range."""
    if not contains(spec, value):
        raise ValueError(f"{where} must be in {spec}, not {value!r}".lstrip())
    return value


def parse(where: str, text: str, spec: str, kind: type = int) -> float:
    """``text`` (from a command line) as a ``kind`` in ``spec``; the error names ``where``."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        kind_name = "an integer" if kind is int else "a number"
        raise ValueError(f"{where} must be {kind_name} in {spec}, not {text!r}".lstrip()) from None
    return check(where, value, spec)
