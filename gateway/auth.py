"""The authentication stage: the client key, checked on the raw header bytes.

A client sends its key as ``Authorization: Bearer <key>`` (the openai client, the anthropic client
2.x's ``auth_token``) or as ``x-api-key: <key>`` (the anthropic client's ``api_key``, Anthropic's
curl examples). Either is accepted; both at once must carry the same key; two of either is a 401.
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

    def authenticate(
        self, authorization: bytes | None, count: int = 1, api_key: list[bytes] | None = None
    ) -> tuple[str, KeyLimits | None] | None:
        """The stage: None when client auth is off, else the identity of the one valid key sent
        (see ``identify``); 401 for a missing or wrong key, for more than one ``Authorization`` or
        ``x-api-key`` header, or for both carrying different keys."""
        if not self._digests:
            return None
        if api_key is None:
            identity = self.identify(authorization) if count == 1 else None
        elif len(api_key) != 1 or count > 1:
            identity = None
        else:
            key = api_key[0].strip()
            identity = self.identify_key(key)
            if identity is not None and authorization is not None:
                bearer = _bearer(authorization)
                if bearer is None or not hmac.compare_digest(bearer, key):
                    identity = None
        if identity is None:
            raise errors.unauthorized()
        return identity

    def identify(self, authorization: bytes | None) -> tuple[str, KeyLimits | None] | None:
        """For a valid ``Bearer`` key: what logs show for it (a keys-file name, else the first 8
        hex digits of the key's SHA-256: safe to log, never the key) and its limits; None for an
        invalid one."""
        key = _bearer(authorization) if authorization is not None else None
        return None if key is None else self.identify_key(key)

    def identify_key(self, key: bytes) -> tuple[str, KeyLimits | None] | None:
        """``identify`` for the key itself."""
        digest = hashlib.sha256(key).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(digest, d)
        if not ok:
            return None
        limits = self._named.get(digest)
        return (limits.name, limits) if limits is not None else (digest.hex()[:8], None)


def _bearer(authorization: bytes) -> bytes | None:
    if authorization[:7].lower() != b"bearer ":
        return None
    return authorization[7:].strip()


def authorization_of(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, int, list[bytes] | None]:
    """The last ``Authorization`` value, how many there were, and every ``x-api-key`` value (None:
    none), for routes the header pass does not see: ``KeyRing.authenticate``'s arguments."""
    values = [v for n, v in headers if n == b"authorization"]
    api_key = [v for n, v in headers if n == b"x-api-key"] or None
    return (values[-1] if values else None), len(values), api_key
