"""Dataclass fields computed on first read.

Inside a CPU layer step each small op costs ~10 us (the expert GEMMs leave the caches cold;
benchmarks/step_overheads.py), so values that only some callers read (statistics for the
logging, index lists the compiled dispatch path does not need) are deferred: such a field may
hold a function of no arguments, which the first read of the field runs, keeping its value.
"""

from __future__ import annotations


class DeferredFields:
    """Mixin for dataclasses: the fields named in `_deferred` may be given as functions."""

    _deferred: frozenset[str] = frozenset()

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if callable(value) and name in type(self)._deferred:
            value = value()
            object.__setattr__(self, name, value)
        return value
