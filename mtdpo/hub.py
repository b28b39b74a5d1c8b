"""Hub names on a machine with no network: one line at once, "no network: ... pass a local
path", not the hub client's five retries (24-51 s) and then an error about repo ids.

The hub counts as unreachable when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, or when a TCP
connection to its endpoint (HF_ENDPOINT, else huggingface.co) fails within PROBE_SECONDS; the
answer is asked once per process. With a proxy set, the client is left to find its way.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from mtdpo.errors import UsageError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `owner/name` or `name`
PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def looks_like_hub_name(name: str) -> bool:
    """Not a path on this machine, and shaped like a hub id."""
    return bool(HUB_NAME.match(name)) and not Path(name).exists()


def unreachable() -> str | None:
    """Why the hub cannot be reached from here, or None when it can (or a proxy decides)."""
    return offline_mode() or probe()


def offline_mode() -> str | None:
    """The variable that puts the hub clients in offline mode, if one is set."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable} is set"
    return None


@functools.cache
def probe() -> str | None:
    """Why a TCP connection to the hub's endpoint fails, or None when it opens or a proxy is set."""
    if any(os.environ.get(variable) for variable in PROXY_VARIABLES):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError as err:
        return f"{endpoint.hostname} cannot be reached ({err.strerror or type(err).__name__})"
    return None


def no_network(what: str, name: str, reason: str, cache_searched: bool = True) -> UsageError:
    where = " nor in the local hub cache" if cache_searched else ""
    return UsageError(f"no network: {what} {name} is not a local path{where}, and {reason}; pass a local path")
