"""The Hugging Face hub, offline-aware (torch-free).

open_clip and huggingface_hub fetch CLIP weights, model configs and tokenizers from the hub. Without
network they retry for most of a minute and end with a message that does not say what to do.
novic instead decides once per process whether the hub is reachable: `HF_HUB_OFFLINE=1` says it
is not, else a short TCP probe of the endpoint (HF_ENDPOINT or huggingface.co) answers. When it
is not, `go_offline()` puts huggingface_hub into offline mode (files already in the HF cache still
load, nothing retries), and `missing_file` words the one error line: the file to fetch, its URL
on another machine, and the flag that takes it.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse

from novic.errors import NovicError

ENV_OFFLINE = "HF_HUB_OFFLINE"
HF_BASE = "https://huggingface.co"
PROBE_SECONDS = 3.0     # a reachable endpoint answers a TCP connect well within this
_TRUE = {"1", "on", "yes", "true"}
_state: dict = {}


class HubOfflineError(NovicError):
    """A file that must come from the Hugging Face hub, which is unreachable or switched off."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_BASE).rstrip("/")


def file_url(repo: str, filename: str) -> str:
    return f"{endpoint()}/{repo}/resolve/main/{filename}"


def offline_by_env() -> bool:
    return (os.environ.get(ENV_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE


def _reachable(url: str, timeout: float) -> bool:
    """A TCP connection to the endpoint's host, bounded in time (name resolution included: it can
    hang longer than any socket timeout, so it runs in a thread that is abandoned after `timeout`)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def offline() -> tuple[bool, str]:
    """(whether the hub is unusable, why), decided once per process and endpoint."""
    url = endpoint()
    if offline_by_env():
        return True, f"{ENV_OFFLINE}=1"
    if url not in _state:
        _state[url] = not _reachable(url, PROBE_SECONDS)
    return (True, f"{url} is unreachable") if _state[url] else (False, "")


def go_offline() -> None:
    """Make huggingface_hub (and open_clip and transformers above it) use the local HF cache only,
    in this process. huggingface_hub read HF_HUB_OFFLINE when it was imported; its constant is what
    it and transformers consult at each call."""
    try:
        from huggingface_hub import constants
    except ImportError:   # then nothing can reach the hub anyway
        return
    constants.HF_HUB_OFFLINE = True


def check_online() -> bool:
    """Call before work that may reach the hub: offline, this switches huggingface_hub to the
    local cache (fast failures instead of retries). Returns whether the hub is usable."""
    is_offline, _ = offline()
    if is_offline:
        go_offline()
    return not is_offline


def in_cache(repo: str, filename: str) -> str | None:
    """The file's path in the local HF cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - a bad repo id or cache: not cached
        return None
    return found if isinstance(found, str) else None


def missing_file(what: str, repo: str, filename: str, flag: str) -> str:
    """The one line for a hub file that is needed but cannot be fetched now."""
    _, why = offline()
    why = why or "the download failed"
    return (f"{what}: not on this machine, and the Hugging Face hub cannot be used ({why}): download "
            f"{file_url(repo, filename)} elsewhere, copy it here and pass {flag} {filename}")


def fetch(repo: str, filename: str, what: str, flag: str) -> str:
    """A hub file: from the HF cache, else downloaded; offline, HubOfflineError at once."""
    path = in_cache(repo, filename)
    if path is not None:
        return path
    if not check_online():
        raise HubOfflineError(missing_file(what, repo, filename, flag))
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # noqa: BLE001 - 404, auth, a dropped connection: the file is not available
        raise HubOfflineError(missing_file(what, repo, filename, flag) + f" ({type(e).__name__})") from None
