"""On-disk cache helpers: where caches live and how files get there without ever being half-written.

Several ranks (or jobs) may build the same cache entry at once. Each writes a private temporary
file in the target directory and publishes it with a hard link, which fails if the entry already
exists: the first writer wins, later writers discard their copy, and every reader sees either no
file or a complete one (on filesystems without hard links, an atomic rename: last writer wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

DEFAULT_CACHE_DIR = "~/.cache/smile"


def cache_root(cache_dir: str | None) -> Path:
    """The cache root: ``cache_dir`` if given, else ~/.cache/smile."""
    return Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))


def content_key(parts: dict[str, object]) -> str:
    """A short stable hash of JSON-serialisable key parts (sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def publish_text(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless it exists; True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: rename, still atomic, last writer wins
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
