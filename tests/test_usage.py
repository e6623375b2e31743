"""Usage: tokens read from the last bytes of a response, once per request."""

from __future__ import annotations

from gateway.exchange import End, Exchange
from gateway.usage import Usage, exchange_usage, find_usage, read_usage


def test_usage_from_the_tail_only() -> None:
    assert find_usage(b'..."usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}') == (7, 3)
    tail = b'data: {"choices":[],"usage": {"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    assert find_usage(tail) == (1, 2)
    assert find_usage(b'"usage":null}') is None
    assert find_usage(b"data: [DONE]\n\n") is None
    assert find_usage(b'"usage":{"prompt_tokens":1,"completion') is None  # cut: no guess
    # Not counts: negative, beyond any real request, booleans, floats.
    for prompt, completion in ((b"-5", b"1"), (b"1", b"1" + b"0" * 30), (b"true", b"1"), (b"1.5", b"2")):
        assert find_usage(b'"usage":{"prompt_tokens":%s,"completion_tokens":%s}' % (prompt, completion)) is None


def test_usage_read_past_the_usual_shape() -> None:
    """Usage that is not a flat object right after the colon is still read, as the json module
    reads it; what it refuses gives nothing."""
    nested = b'"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1},"completion_tokens":4}}'
    assert find_usage(nested) == (3, 4)
    assert find_usage(b'"usage":{"note":"}{","prompt_tokens":5,"completion_tokens":6}') == (5, 6)
    assert find_usage(b'"usage" \r\n:\t{"prompt_tokens":7,"completion_tokens":8}') == (7, 8)
    assert find_usage(b'"usage" x:{"prompt_tokens":1,"completion_tokens":2}') == (1, 2)  # as json reads it
    assert find_usage(b'"usage":{"prompt_tokens":NaN,"completion_tokens":2}') is None
    assert find_usage(b'"usage":{"prompt_tokens":1,"completion_tokens":2,"x":"\xff"}') == (1, 2)
    assert find_usage(b'"usage":{"prompt_tokens":1,"prompt_tokens":9,"completion_tokens":2}') == (9, 2)


def test_usage_of_the_last_two_pieces_is_that_of_both_joined() -> None:
    """``exchange_usage`` reads the last piece alone when it holds ``"usage"``: at every split of
    these tails (usage whole in the last piece, cut across both, cut twice, absent) it finds what
    ``find_usage`` finds in the two pieces joined."""
    tails = [
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n',
        b'{"usage":{"prompt_tokens":9,"completion_tokens":9}},"usage": {"prompt_tokens":3,"completion_tokens":4}}',
        b'"usage":{"prompt_tokens":5,"completion_tokens":6}} "usage":null',
        b"data: [DONE]\n\n",
    ]
    found = 0
    for tail in tails:
        for cut in range(len(tail) + 1):
            ex = Exchange()
            ex.prev, ex.last = tail[:cut], tail[cut:]
            assert exchange_usage(ex) == find_usage(tail), (tail, cut)
            found += exchange_usage(ex) is not None
    assert found > 0


def _finished(status: int = 200, *, sse: bool = False, chunks: int = 0, end: End = "done") -> Exchange:
    ex = Exchange(1.0)
    ex.status, ex.started, ex.sse, ex.chunks, ex.end = status, True, sse, chunks, end
    return ex


def test_read_usage_is_the_backends_else_a_streams_estimate() -> None:
    """What ``read_usage`` gives the metrics and the tpm limit: the backend's usage; for a stream
    without one, its content chunks (less the role chunk, and the finish chunk and [DONE] when it
    ended whole); nothing for other bodies or for answers that were not a success."""
    ex = _finished()
    ex.last = b'{"usage":{"prompt_tokens":7,"completion_tokens":3}}'
    usage = read_usage(ex)
    assert usage == Usage(7, 3) and usage is not None and usage.total == 10
    stream = _finished(sse=True, chunks=9)
    stream.last = b'data: {"usage":{"prompt_tokens":2,"completion_tokens":5}}\n\ndata: [DONE]\n\n'
    assert read_usage(stream) == Usage(2, 5, estimated=False)
    assert read_usage(_finished(sse=True, chunks=9)) == Usage(0, 6, estimated=True)
    assert read_usage(_finished(sse=True, chunks=9, end="client_gone")) == Usage(0, 8, estimated=True)
    assert read_usage(_finished(sse=True, chunks=1)) == Usage(0, 0, estimated=True)
    assert read_usage(_finished()) is None  # a body without usage
    failed = _finished(500)
    failed.last = ex.last
    assert read_usage(failed) is None
    unstarted = Exchange(1.0)
    unstarted.status, unstarted.last = 200, ex.last
    assert read_usage(unstarted) is None
