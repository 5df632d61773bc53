"""Remote media downloads that cannot be pointed at the server's own network (SSRF).

Every host is resolved before connecting and each address it resolves to must be public
(not loopback, private, link-local, multicast, reserved or unspecified, also when written
as an IPv4-mapped, 6to4 or NAT64 IPv6 address). The connection goes to the checked
address itself, so a second DNS answer cannot swap it (rebinding). Redirects are followed
by hand, each hop checked again. One deadline covers the whole download, and the download
is a coroutine of the request, so it ends with the request. Callers see one generic error;
the reason goes to the log.
"""

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore

log = logging.getLogger("mlx_smolvlm.server")

MAX_REDIRECTS = 3
# Addresses inside these IPv6 ranges embed an IPv4 address that is what really gets reached.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """Why a download was refused or failed; logged, never shown to the client."""


@dataclass
class FetchPolicy:
    timeout: float = 10.0  # seconds for the whole download, redirects included
    max_bytes: int = 20 * 2**20
    allow_private: bool = False  # loopback and private networks too (local setups)
    allowed_domains: tuple[str, ...] | None = None  # only these host names, if given


def address_allowed(address: str, allow_private: bool = False) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    if ip.is_unspecified or ip.is_multicast:
        return False
    if allow_private:
        return True
    return ip.is_global and not (ip.is_reserved or ip.is_link_local or ip.is_loopback)


def check_url(url: str, policy: FetchPolicy) -> tuple[str, str, int]:
    """(scheme, ASCII host, port) of an http(s) URL the policy accepts; FetchError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as e:  # a port above 65535, a bad IPv6 literal
        raise FetchError(f"malformed URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"scheme {parts.scheme!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise FetchError("credentials in the URL")
    if not host:
        raise FetchError("no host")
    try:
        host = host.rstrip(".").encode("idna").decode("ascii") if not host.isascii() else host.rstrip(".")
    except UnicodeError as e:
        raise FetchError(f"host is not a valid IDNA name: {e}") from None
    if not host or not all(c.isprintable() and not c.isspace() and c not in "/\\" for c in host):
        raise FetchError("invalid host")
    if policy.allowed_domains is not None and host.lower() not in policy.allowed_domains:
        raise FetchError(f"host {host} is not in --allowed-media-domains")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses that pass `address_allowed`."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise FetchError(f"cannot resolve {host}: {e}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not address_allowed(a, self.allow_private)]
        if refused or not addresses:  # every address must be public: one DNS answer can mix them
            raise FetchError(f"{host} resolves to a refused address {refused}")
        return await self.inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float):
        await self.inner.sleep(seconds)


async def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body behind `url` (following up to MAX_REDIRECTS checked redirects) within
    `policy.max_bytes` and one `policy.timeout`; FetchError (or TimeoutError) otherwise."""
    async with asyncio.timeout(policy.timeout):
        async with httpcore.AsyncConnectionPool(network_backend=CheckedBackend(policy.allow_private),
                                                retries=0, max_connections=1) as pool:
            for _ in range(MAX_REDIRECTS + 1):
                scheme, host, port = check_url(url, policy)
                parts = urlsplit(url)
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                target = httpcore.URL(scheme=scheme, host=host, port=port, target=path)
                headers = [("Host", host if port in (80, 443) else f"{host}:{port}"),
                           ("Accept", "image/*, video/*"), ("User-Agent", "mlx-smolvlm")]
                async with pool.stream("GET", target, headers=headers) as r:
                    if r.status in (301, 302, 303, 307, 308):
                        location = dict((k.lower(), v) for k, v in r.headers).get(b"location")
                        if not location:
                            raise FetchError(f"redirect {r.status} without a location")
                        url = urljoin(url, location.decode("latin-1"))
                        continue
                    if r.status != 200:
                        raise FetchError(f"status {r.status}")
                    data = bytearray()
                    async for chunk in r.aiter_stream():
                        data += chunk
                        if len(data) > policy.max_bytes:
                            raise FetchError(f"over {policy.max_bytes} bytes")
                    return bytes(data)
            raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def fetch_or_log(url: str, policy: FetchPolicy) -> bytes | None:
    """`fetch`, with every failure logged and turned into None (the caller's one error text)."""
    try:
        return await fetch(url, policy)
    except (FetchError, TimeoutError, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.TimeoutException, httpcore.UnsupportedProtocol, OSError, ValueError) as e:
        log.warning("media fetch of %.200s refused or failed: %s: %s", url, type(e).__name__, e)
        return None
