"""Request ids: the client's ``X-Request-ID`` when it is safe to log and forward, else a new one."""

from __future__ import annotations

import random
import re

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_random_bits = random.getrandbits


def request_id(given: bytes | None) -> bytes:
    """The client's X-Request-ID when it is 1-128 of ``[A-Za-z0-9._-]``, else a new one: 96
    random bits in hex, from ``random`` (no system call per request as with os.urandom; the
    module reseeds itself in a forked worker, so workers never share a sequence)."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return b"%024x" % _random_bits(96)
