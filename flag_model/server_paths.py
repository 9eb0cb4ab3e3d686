"""Paths typed by a user of a shared server: allowed only as regular files inside a configured root folder.

The option is off until the operator names a root (`FLAG_TRADER_SERVER_ROOT`, or `server_root` in
`.streamlit/secrets.toml`, read by `flag_model.ui`). A path is resolved (symlinks followed) and must lie inside
the resolved root and be a regular file. Missing, outside, a folder, a device, a NUL byte or a name too long all
give the same message, so the answer tells nothing about files outside the root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ROOT_ENV = "FLAG_TRADER_SERVER_ROOT"


class ServerPathError(ValueError):
    """A server path that is not a readable regular file inside the root; the message is the same for every cause."""


def server_root(configured: str | None = None) -> Path | None:
    """The root folder from `FLAG_TRADER_SERVER_ROOT`, else `configured` (e.g. a secrets entry); None when neither
    names an existing folder (the server-path option is then off)."""
    for raw in (os.environ.get(ROOT_ENV), configured):
        if raw and str(raw).strip():
            try:
                root = Path(str(raw).strip()).resolve(strict=True)
            except (OSError, RuntimeError, ValueError):
                continue
            if root.is_dir():
                return root
    return None


def resolve_under_root(text: str, root: Path) -> Path:
    """The regular file `text` names inside `root` (relative names are taken from the root; `~` is not expanded).

    Raises ServerPathError with one message for every refusal."""
    refused = ServerPathError(
        "no readable file at that path inside the server folder. Give the file's path "
        "relative to the server folder (or its full path inside it), or upload the file."
    )
    try:
        name = str(text).strip()
        if not name or "\x00" in name or len(name) > 4096:
            raise refused
        path = (root / name).resolve(strict=True)  # an absolute `name` replaces the root here; checked below
        if not path.is_relative_to(root) or not stat.S_ISREG(path.stat().st_mode):
            raise refused
    except (OSError, RuntimeError, ValueError):  # missing, loops, name too long, permission
        raise refused from None
    return path
