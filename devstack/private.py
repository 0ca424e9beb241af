"""Files under the data folder that hold secrets: written owner-only (0600), never printed."""
from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PRIVATE_MODE = 0o600
SECRET_BYTES = 32


def write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, owner-only."""
    write_private_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_private_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically; the file is 0600 from its first byte, not chmod-ed afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        # On disk before the rename, so a crash never leaves an empty credentials file behind.
        os.fsync(out.fileno())
    os.replace(scratch, path)


def read_private_json(path: Path) -> dict[str, Any] | None:
    """The file's object, or None when absent. A file others can read is tightened, not trusted less."""
    if not path.exists():
        return None
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(PRIVATE_MODE)
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_or_create_secrets(path: Path, *, names: Iterable[str],
                           make: Callable[[], str] = lambda: secrets.token_urlsafe(SECRET_BYTES)) -> dict[str, str]:
    """The named secrets, made by ``make`` (random text by default) on first use and kept for every
    later run.

    Kept because a new token secret on each start would sign out every client of the demo.
    """
    stored = read_private_json(path) or {}
    missing = [name for name in names if not stored.get(name)]
    if missing:
        for name in missing:
            stored[name] = make()
        write_private_json(path, stored)
    return {str(k): str(v) for k, v in stored.items()}
