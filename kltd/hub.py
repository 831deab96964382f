"""Whether the Hugging Face hub can be reached, decided once per job, so that nothing waits on it.

Without a network (or with HF_HUB_OFFLINE set) transformers and datasets retry for about a minute before
they fail. kltd asks once per job (`forget` starts a job afresh), in at most 3 s; when the hub is out of reach,
models and datasets are read from the local cache only, and a name that is not there is refused in one line.
Nothing is switched for the whole process: models are loaded with local_files_only, datasets inside
`cache_only_when_offline()`. Used by every layer that loads from the hub; imports nothing of kltd.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

TRUE = ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Asked once until `forget()`: the first time in at most 3 s, then at once."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in TRUE:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def why_offline() -> str:
    return "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "the hub cannot be reached"


def forget() -> None:
    """A new job asks again: the network may have come back (or gone) since the last one."""
    hub_reachable.cache_clear()


_OFFLINE_SWITCHES = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"))


@contextmanager
def cache_only_when_offline() -> Iterator[None]:
    """While the block runs, with the hub out of reach, huggingface_hub and datasets read their caches only (no
    retries); afterwards everything is as it was."""
    if hub_reachable():
        yield
        return
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    modules = []
    for module, attribute in _OFFLINE_SWITCHES:
        try:
            modules.append((__import__(module, fromlist=[attribute]), attribute))
        except ImportError:
            pass
    saved = [getattr(m, a) for m, a in modules]
    os.environ["HF_HUB_OFFLINE"] = "1"
    for m, a in modules:
        setattr(m, a, True)
    try:
        yield
    finally:
        for (m, a), value in zip(modules, saved):
            setattr(m, a, value)
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def in_model_cache(name: str) -> bool:
    """Whether a hub model's config.json is in the local Hugging Face cache."""
    return cached_model_dir(name) is not None


def cached_model_dir(name: str) -> str | None:
    """The local snapshot directory of a hub model in the Hugging Face cache (None if it is not there)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not installed, or not a valid repo id
        return None
    return str(Path(found).parent) if isinstance(found, str) else None
