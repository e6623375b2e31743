"""Peek at a JSON request body: only as far as routing needs, with decoders built once."""

from __future__ import annotations

import msgspec

from gateway.errors import GatewayError, bad_request


class Peek(msgspec.Struct):
    """The few fields the gateway looks at; everything else is skipped, not decoded."""

    model: str | None = None
    stream: bool | None = None
    tools: msgspec.Raw = msgspec.Raw()
    #: The Responses API's stored response to continue (``stateful``): raw, so a value of the
    #: wrong type is the backend's to refuse, not a 400 of the gateway's on every route.
    previous_response_id: msgspec.Raw = msgspec.Raw()

    @property
    def wants_tools(self) -> bool:
        raw = self.tools
        # Longer than "null": tools listed (no copy of a long array just to compare it).
        return len(raw) > 4 or bytes(raw) not in (b"", b"null", b"[]")


_peek_decoder = msgspec.json.Decoder(Peek)
_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


def peek(body: bytes) -> Peek:
    """Decode the routing fields; a body that is not a JSON object is a 400."""
    try:
        return _peek_decoder.decode(body)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if msg.startswith("Expected `object`"):
            raise bad_request("The request body must be a JSON object.") from None
        param = msg.rsplit("$.", 1)[1].rstrip("`") if "- at `$." in msg else None
        raise bad_request(f"Invalid request body: {msg}.", param=param) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.") from None
    except UnicodeDecodeError:  # a string field (``model``) that is not UTF-8
        raise bad_request("The request body is not valid JSON: a string is not valid UTF-8.") from None
    except RecursionError:  # msgspec's depth limit: a body nested more deeply than any real request
        raise bad_request("The request body is nested too deeply.") from None


def with_model(body: bytes, model: str) -> bytes:
    """``body`` with ``model`` set; every other value stays as the client's raw bytes."""
    try:
        fields = _object_decoder.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:  # peek() accepted it; be safe
        raise GatewayError(400, "invalid_request_error", "invalid_request", str(exc)) from None
    fields["model"] = msgspec.Raw(_encoder.encode(model))
    return _encoder.encode(fields)
