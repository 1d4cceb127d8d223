"""Where the models of a bench command come from, checked before anything loads.

The rules are `easyref.resolve`'s, the same as `easyref generate`'s: `default` (the bundled model's
part), a folder, or a hub id that is cached (used without asking the hub) or that the hub serves. A
hub id that is neither cached nor reachable fails here in one line, naming the `hf download` command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..resolve import ResolveError, resolve

SourceError = ResolveError  # the name the bench modules catch


@dataclass(frozen=True)
class Source:
    value: str
    path: str  # what to load: a local folder, or a hub id that the loader will download
    local: bool  # `default`, or a folder or file on this machine
    cached: bool  # a hub id whose snapshot is in the local cache

    @property
    def offline_ok(self) -> bool:
        """Whether it can load without the network (then it should: no update checks, no retries)."""
        return self.local or self.cached


def check_source(value, flag: str, kind: str = "model", probe: str | None = None) -> Source:
    """Refuse a missing local path, or a hub id that is neither cached nor reachable; say which it is.

    `kind` is `easyref.resolve`'s ("base", "mllm", "adapter", or "model" for any transformers model);
    `probe` the file that marks the model's root folder, instead of the kind's.
    """
    found = resolve(value, kind, label=f"{flag} {value}", probe=probe)
    local = found.source in ("local", "default")
    cached = found.source == "hub" and Path(found.path).exists()  # else the hub id, for its loader to fetch
    return Source(str(value), found.path, local=local, cached=cached)
