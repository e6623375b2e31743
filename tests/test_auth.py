"""gateway/auth.py: client keys, checked on raw header bytes."""

from __future__ import annotations

import hashlib

import pytest

from gateway.auth import KeyRing
from gateway.errors import GatewayError


def test_keyring() -> None:
    ring = KeyRing(["k1", "k2"])
    assert ring.enabled
    k1_id = hashlib.sha256(b"k1").hexdigest()[:8]
    assert ring.identify(b"Bearer k1") == ring.identify(b"BEARER k1 ") == (k1_id, None)
    assert ring.identify(b"bearer k2") is not None
    for bad in (None, b"", b"k1", b"Bearer", b"Bearer k3", b"Basic k1", b"Bearer k1k1", b"Bearerk1"):
        assert ring.identify(bad) is None
        with pytest.raises(GatewayError) as refused:
            ring.authenticate(bad)
        assert refused.value.status == 401
    assert ring.authenticate(b"Bearer k1") == (k1_id, None)
    with pytest.raises(GatewayError):  # two Authorization headers, even with a good key
        ring.authenticate(b"Bearer k1", count=2)
    off = KeyRing([])
    assert not off.enabled and off.authenticate(None) is None and off.authenticate(b"x", count=2) is None
    assert "k1" not in repr(ring._digests)  # only digests are held
