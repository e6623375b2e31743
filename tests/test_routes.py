"""gateway/routes.py: the static path table."""

from __future__ import annotations

from gateway import routes


def test_routes() -> None:
    assert routes.resolve("/v1/chat/completions") is routes.CHAT
    assert routes.resolve("/v1/models") is routes.MODELS
    assert routes.resolve("/v1/models/org/model-7b") is routes.PASSTHROUGH
    assert routes.resolve("/v1/responses/r1") is routes.RESPONSES
    assert routes.resolve("/v1/audio/transcriptions") is routes.PASSTHROUGH
    assert routes.resolve("/v1/.well/x") is routes.PASSTHROUGH  # a dot that is not a dot segment
    for bad in ("/", "/v1", "/v2/x", "/metrics2", "/v1/../load", "/v1/./x", "/v1/a/.."):
        assert routes.resolve(bad) is None
