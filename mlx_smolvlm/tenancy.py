"""API keys and the cache partition of each request.

Several keys may be configured (repeated --api-key, or --api-keys-file with one key per
line). Each key is a tenant: the prompt-prefix and image-feature caches are partitioned by
tenant, and further by a request's `cache_salt` (vLLM's field), so `cached_tokens` and
timing never tell one client what another sent.
"""

import hashlib
import hmac
from pathlib import Path

ANONYMOUS = "anonymous"


def read_keys(keys: list[str] | None, keys_file: str | None) -> list[str]:
    out = [k for k in keys or [] if k]
    if keys_file:
        lines = Path(keys_file).read_text().splitlines()
        out += [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    return list(dict.fromkeys(out))


class Tenants:
    def __init__(self, keys: list[str]):
        # A tenant is named by a digest of its key: logs and caches never hold the key.
        self.keys = [(f"Bearer {k}".encode(), hashlib.sha256(k.encode()).hexdigest()[:16]) for k in keys]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str) -> str | None:
        """The tenant whose key the header carries; None for no or a wrong key. Every key is
        compared (in constant time each), so timing does not say which one nearly matched."""
        if not self.keys:
            return ANONYMOUS
        given, found = authorization.encode("utf-8", "replace"), None
        for expected, tenant in self.keys:
            if hmac.compare_digest(given, expected):
                found = tenant
        return found


def partition(tenant: str, cache_salt: str | None) -> bytes:
    """Cache partition of a request; b"" (shared) without keys and salt, as before."""
    if tenant == ANONYMOUS and cache_salt is None:
        return b""
    return hashlib.sha256(f"{tenant}\0{cache_salt or ''}".encode("utf-8", "surrogatepass")).digest()[:16]
