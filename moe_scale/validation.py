"""The error every configuration section raises, and the two checks they are written with.

A `ConfigError` is a `ValueError` whose message names the key and the fix. The engine's
`MoEConfig`, the parallel layout, the trainer's sections and each client's model and data
sections all raise it, so a caller catches one type whatever the section.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def check(ok: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `ok`."""
    if not ok:
        raise ConfigError(message)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """`key`'s `value` must be one of `allowed`."""
    check(value in allowed, f"{key} must be one of {list(allowed)}, got {value!r}")
