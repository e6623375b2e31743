"""Client key check on the raw ``Authorization`` header bytes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


class KeyRing:
    """The configured client keys, held only as SHA-256 digests.

    A presented key is hashed and compared with every digest in constant time, so neither the
    comparison nor the number of keys checked tells an attacker anything about the keys.
    """

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: bytes | None) -> bool:
        """True when ``authorization`` is ``Bearer <one of the keys>`` (scheme case-insensitive)."""
        return not self._digests or self.verify(authorization) is not None

    def verify(self, authorization: bytes | None) -> str | None:
        """The key id (see ``key_id``) of a valid ``Bearer`` key, else None."""
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return None
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        return digest.hex()[:8] if ok else None


def key_id(key: bytes) -> str:
    """The first 8 hex digits of a key's SHA-256: safe to log, never the key itself."""
    return hashlib.sha256(key).hexdigest()[:8]
