"""Secrets never reach a saved config, a log or W&B.

A value is secret when its key's name says so (ends in token, key or secret) or when it equals the value of
a secret environment variable (WANDB_API_KEY, HF_TOKEN, any variable ending in _TOKEN, _KEY or _SECRET):
the latter catches a secret pulled into a config through ${oc.env:...}.
"""

from __future__ import annotations

import os

REDACTED = "<redacted>"
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET")
SECRET_NAMES = ("WANDB_API_KEY", "HF_TOKEN")


def secret_values() -> set[str]:
    return {value for name, value in os.environ.items()
            if (name in SECRET_NAMES or name.upper().endswith(SECRET_SUFFIXES)) and len(value) >= 6}


def _secret_key(key) -> bool:
    name = str(key).lower()
    return name.endswith(("token", "secret", "api_key", "password")) or name in ("key", "apikey")


def redact(value, secrets: set[str] | None = None):
    """A copy of a config (nested dicts and lists) with every secret replaced by "<redacted>"."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) and v not in (None, "") else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str) and any(secret in value for secret in secrets):
        return REDACTED
    return value
