"""The authentication stage: the client key, checked on the raw ``Authorization`` header bytes.

One path for every route that needs a key, forwarded or answered by the gateway itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from gateway import errors
from gateway.limits import KeyLimits


class KeyRing:
    """The configured client keys, held only as SHA-256 digests.

    A presented key is hashed and compared with every digest in constant time, so neither the
    comparison nor the number of keys checked tells an attacker anything about the keys. Keys from
    a keys file carry a name and limits (``gateway.limits``).
    """

    __slots__ = ("_digests", "_named")

    def __init__(self, keys: Iterable[str], named: Mapping[bytes, KeyLimits] | None = None) -> None:
        self._named = dict(named or {})
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys) + tuple(self._named)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, authorization: bytes | None, count: int = 1) -> tuple[str, KeyLimits | None] | None:
        """The stage: None when client auth is off, else the identity of the one valid key sent
        (see ``identify``); 401 for a missing or wrong key, or for ``count`` other than one."""
        if not self._digests:
            return None
        identity = self.identify(authorization) if count == 1 else None
        if identity is None:
            raise errors.unauthorized()
        return identity

    def identify(self, authorization: bytes | None) -> tuple[str, KeyLimits | None] | None:
        """For a valid ``Bearer`` key: what logs show for it (a keys-file name, else the first 8
        hex digits of the key's SHA-256: safe to log, never the key) and its limits; None for an
        invalid one."""
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return None
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        if not ok:
            return None
        limits = self._named.get(digest)
        return (limits.name, limits) if limits is not None else (digest.hex()[:8], None)


def authorization_of(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, int]:
    """The last ``Authorization`` value and how many there were, for routes the header pass
    does not see."""
    values = [v for n, v in headers if n == b"authorization"]
    return (values[-1] if values else None), len(values)
