"""gateway/auth.py: client keys, checked on raw header bytes."""

from __future__ import annotations

import hashlib

from gateway.auth import KeyRing, key_id


def test_keyring() -> None:
    ring = KeyRing(["k1", "k2"])
    assert ring.enabled
    assert ring.check(b"Bearer k1") and ring.check(b"bearer k2") and ring.check(b"BEARER k1 ")
    for bad in (None, b"", b"k1", b"Bearer", b"Bearer k3", b"Basic k1", b"Bearer k1k1", b"Bearerk1"):
        assert not ring.check(bad)
    off = KeyRing([])
    assert not off.enabled and off.check(None)
    assert key_id(b"k1") == hashlib.sha256(b"k1").hexdigest()[:8]
    assert "k1" not in repr(ring._digests)  # only digests are held
