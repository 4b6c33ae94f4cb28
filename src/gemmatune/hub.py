"""Fail fast without internet: is the Hugging Face hub reachable, and is a model already cached?

Offline, huggingface_hub 2.x retries every request five times with backoff (about 25 s per file,
and a model load asks for several files), then transformers falls back to the cache or fails with
a message about connections. One short TCP probe answers the question up front, so the user gets
"cannot be downloaded here" in seconds, or a cached model loads with `local_files_only`.
"""

from __future__ import annotations

import functools
import logging
import socket
import urllib.request
from urllib.parse import urlparse

from gemmatune.errors import GemmatuneError

log = logging.getLogger("gemmatune")

PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """True when a TCP connection to the hub endpoint opens within PROBE_TIMEOUT_S."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if urllib.request.getproxies().get("https"):
        return True  # a proxy decides; a direct probe would say nothing about it
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def settle_offline() -> None:
    """When the hub cannot be reached, tell huggingface_hub so (`HF_HUB_OFFLINE`) before other libraries ask it.

    Some do at import: bitsandbytes' CPU backend fetches a kernel through `kernels` on AVX512-BF16 CPUs, and
    huggingface_hub fetches its agent registry for the user agent; offline, each is a lookup and a wait for
    nothing. Called once by the CLI before it loads anything; a library user decides for themselves.
    """
    import os

    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries that read the environment at import
        constants.HF_HUB_OFFLINE = True  # for huggingface_hub, already imported here


def use_cache_only(repo_id: str, revision: str | None, key: str = "model.name") -> bool:
    """Whether a hub model must load from the local cache (hub unreachable); raises if it is not cached."""
    if hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        log.warning("the hub cannot be reached; using the cached copy of %s", repo_id)
        return True
    raise GemmatuneError(
        f"{key}: {repo_id} is not in the local Hugging Face cache and cannot be downloaded here (no connection "
        "to the hub); download it where there is internet (hf download ID) or use a local folder, a .gguf file "
        "or 'embedded'"
    )
