"""The one-line refusals every config section uses: a user error, reported without a traceback, that names
the key, the value and what would be valid."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the configuration: reported as one line, no traceback."""


def choice(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, options))}")


def at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def in_unit_interval(key: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1]")


def positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")
