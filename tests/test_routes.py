"""gateway/routes.py: the static path table."""

from __future__ import annotations

from gateway import routes


def test_routes() -> None:
    assert routes.resolve("/v1/chat/completions") is routes.CHAT
    assert routes.resolve("/v1/models") is routes.MODELS
    assert routes.resolve("/v1/models/org/model-7b") is routes.PASSTHROUGH
    assert routes.resolve("/v1/responses") is routes.RESPONSES
    assert routes.resolve("/v1/responses/r1") is routes.RESPONSE_BY_ID
    assert routes.resolve("/v1/responses/r1/input_items") is routes.RESPONSE_BY_ID
    assert routes.response_id("/v1/responses/resp_1/cancel") == routes.response_id("/v1/responses/resp_1") == "resp_1"
    assert routes.resolve("/v1/messages") is routes.MESSAGES
    assert routes.resolve("/v1/messages/count_tokens") is routes.COUNT_TOKENS
    assert routes.resolve("/tokenize") is routes.TOKENIZE
    assert routes.resolve("/detokenize") is routes.DETOKENIZE
    for spelling in ("/v1/rerank", "/v2/rerank", "/rerank"):
        assert routes.resolve(spelling) is routes.RERANK
    assert routes.resolve("/v1/score") is routes.resolve("/score") is routes.SCORE
    assert routes.resolve("/v1/audio/transcriptions") is routes.PASSTHROUGH
    assert routes.resolve("/v1/.well/x") is routes.PASSTHROUGH  # a dot that is not a dot segment
    for bad in (
        "/",
        "/v1",
        "/v2/x",
        "/tokenize/x",
        "/v1/tokenize/../x",
        "/metrics2",
        "/v1/../load",
        "/v1/./x",
        "/v1/a/..",
    ):
        assert routes.resolve(bad) is None
