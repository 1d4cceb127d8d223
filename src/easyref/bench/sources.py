"""Where the models of a bench command come from, checked before anything loads.

A value that looks like a path must exist. A hub id that is not in the local Hugging Face cache needs
the hub: with HF_HUB_OFFLINE set, or when the hub cannot be reached, loading it would only fail, and
huggingface_hub's retries make that failure take about a minute; here it takes one connection attempt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0


class SourceError(ValueError):
    """A model source that cannot be used (one line, naming the flag)."""


@dataclass(frozen=True)
class Source:
    value: str
    local: bool  # a folder or file on this machine
    cached: bool  # a hub id whose files are (at least partly) in the local cache

    @property
    def offline_ok(self) -> bool:
        """Whether it can load without the network (then it should: no update checks, no retries)."""
        return self.local or self.cached


def looks_local(value: str) -> bool:
    """Hub ids are 'owner/name'; anything else (or anything that exists here) is a path."""
    return value.startswith((".", "/", "~")) or Path(value).exists() or value.count("/") != 1


def check_source(value, flag: str, probe_file: str = "config.json") -> Source:
    """Refuse a missing local path, or a hub id that is neither cached nor reachable; say which it is."""
    value = str(value)
    if looks_local(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise SourceError(f"{flag} {value}: no such file or folder")
        if path.is_dir() and probe_file and not (path / probe_file).is_file():
            raise SourceError(f"{flag} {value}: no {probe_file} in this folder (not the model folder?)")
        return Source(value, local=True, cached=False)
    if _cached(value, probe_file):
        return Source(value, local=False, cached=True)
    why = hub_unavailable()
    if why:
        raise SourceError(f"{flag} {value}: not in the local Hugging Face cache and {why}; "
                          "download it first or give a local folder")
    return Source(value, local=False, cached=False)


def _cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an id the hub library refuses to parse: let the loader say what is wrong
        return False


_probe_result: dict[str, str | None] = {}


def hub_unavailable() -> str | None:
    """None when the hub answers; else why not (offline mode, or the connection error), in words."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _probe_result:
        _probe_result[endpoint] = _probe(endpoint)
    return _probe_result[endpoint]


def _probe(endpoint: str) -> str | None:
    try:
        from huggingface_hub import get_session

        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)  # any HTTP answer means reachable
    except Exception as err:  # DNS failure, refused connection, timeout, proxy error ...
        reason = " ".join(str(err).split()) or type(err).__name__
        return f"{endpoint} cannot be reached ({reason})"
    return None
