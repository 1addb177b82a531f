"""Fail fast, with the flags to use instead, when a download cannot work.

Hub and URL loads retry for about a minute before giving up; a 3-second connection check first
turns "no network" into an immediate one-line error.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from trainer_pkg.errors import UserError

HUB_HOST = "huggingface.co"


@functools.lru_cache(maxsize=None)
def reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_download(what: str, source: str, hint: str) -> None:
    """Raise a UserError naming `hint` when `source` (a URL or hub id) cannot be fetched."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    host = urlparse(source).hostname if "://" in source else HUB_HOST
    if offline and host == HUB_HOST:
        reason = "HF_HUB_OFFLINE is set"
    elif not reachable(host):
        reason = f"{host} is unreachable"
    else:
        return
    raise UserError(f"cannot download {what} {source!r} ({reason}): {hint}")
