"""Where one replica lives: its address, the request-target it is sent, and its TLS context."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import httpcore

from gateway.config import Settings
from gateway.profiles import Profile


class Target:
    """One replica's address and what every request to it carries; built once per worker."""

    def __init__(self, base_url: str, profile: Profile, api_key: str) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme.encode()
        host = parts.hostname or ""
        default_port = 443 if scheme == b"https" else 80
        port = parts.port or default_port
        self.scheme = scheme
        self.host = host
        self.port = port
        self.origin = httpcore.Origin(scheme, host.encode("idna"), port)
        host_header = host if ":" not in host else f"[{host}]"
        if port != default_port:
            host_header = f"{host_header}:{port}"
        self.host_header = host_header.encode("idna")
        base_path = parts.path.rstrip("/")
        #: Client path ``/v1/x`` goes to ``base_path + /x``: the base URL's path replaces ``/v1``.
        self.base_path = base_path.encode()
        #: The server root, for health paths (the base URL without a trailing /v1).
        self.root_path = (base_path[: -len("/v1")] if base_path.endswith("/v1") else base_path).encode()
        self.auth_headers: list[tuple[bytes, bytes]] = (
            [(b"authorization", b"Bearer " + api_key.encode())] if api_key and profile.takes_key else []
        )
        self.base_url = base_url
        #: The replica in metrics labels: ``host:port``, never the URL's credentials or path.
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.display = f"{profile.display_name} at {base_url}"
        #: Sent with every request: Host and the backend's key.
        self.static_headers: list[tuple[bytes, bytes]] = [(b"host", self.host_header), *self.auth_headers]

    def upstream_target(self, raw_path: bytes, query: bytes, rooted: bool = False) -> bytes:
        """The request-target for a client path that starts with ``/v1``, or for a path relative
        to the server root (``rooted``: a kind's own spelling of a route, ``Profile.paths``)."""
        target = self.root_path + raw_path if rooted else self.base_path + raw_path[3:]
        return target + b"?" + query if query else target

    def url(self, target: bytes) -> httpcore.URL:
        """The full URL of ``target`` on this replica, for httpcore's own request API."""
        return httpcore.URL(scheme=self.scheme, host=self.origin.host, port=self.port, target=target)


def make_ssl_context(settings: Settings, base_url: str) -> ssl.SSLContext | None:
    """The TLS context for an ``https:`` base URL (HTTP/1.1 by ALPN); None for plain HTTP."""
    if not base_url.startswith("https:"):
        return None
    ctx = ssl.create_default_context(cafile=settings.gateway_ca_bundle or None)
    if not settings.gateway_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
