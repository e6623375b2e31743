"""gateway/payload.py: peeking at a request body, and filling in the model."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.payload import peek, with_model


def test_peek() -> None:
    p = peek(b'{"model":"m","stream":true,"messages":[{"deep":[[[{}]]]}],"tools":[{"type":"function"}]}')
    assert (p.model, p.stream, p.wants_tools) == ("m", True, True)
    p = peek(b'{"tools": null}')
    assert (p.model, p.stream, p.wants_tools) == (None, None, False)
    assert not peek(b'{"tools": []}').wants_tools
    for bad, status_fragment in ((b"[]", "JSON object"), (b"{", "not valid JSON"), (b'{"model":1}', "$.model")):
        with pytest.raises(GatewayError) as info:
            peek(bad)
        assert info.value.status == 400 and status_fragment in info.value.message


def test_with_model_keeps_other_values_raw() -> None:
    body = b'{"messages":[{"content":"caf\\u00e9 \xf0\x9f\x98\x80"}],"n":1.50,"model":null}'
    out = with_model(body, 'm "quoted"')
    assert orjson.loads(out)["model"] == 'm "quoted"'
    assert b'"content":"caf\\u00e9 \xf0\x9f\x98\x80"' in out  # untouched bytes
    assert b'"n":1.50' in out
    assert orjson.loads(with_model(b"{}", "x")) == {"model": "x"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"m","previous_response_id":"resp_1"}', "resp_1"),
        (b'{"model":"m","previous_response_id":5}', None),  # the backend's to refuse: no 400 here
        (b'{"model":"m","previous_response_id":null}', None),
        (b'{"model":"m"}', None),
    ],
)
def test_the_previous_response_id_is_read_in_the_same_decode(body: bytes, expected: str | None) -> None:
    from gateway import routes
    from gateway.stateful import Stateful

    peeked = peek(body)  # never a 400 for this field, on any route
    state = Stateful()
    fallback, stored = object(), object()  # stand-ins for a backend and a replica
    if expected is not None:
        state.ids.put(expected, stored, stored)  # type: ignore[arg-type]
    decoy = object()  # ids a wrong reading of the other cases could look up
    for wrong in ("5", "null", "None", ""):
        state.ids.put(wrong, decoy, decoy)  # type: ignore[arg-type]
    create = routes.resolve("/v1/responses")
    assert create is not None
    found = state.route(create, "/v1/responses", peeked.previous_response_id, fallback)  # type: ignore[arg-type]
    assert found == ((stored, stored) if expected is not None else (fallback, None))
