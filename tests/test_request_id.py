"""Request ids: the client's when safe, else a fresh one per request and per worker."""

from __future__ import annotations

from gateway.request_id import request_id


def test_request_id_rules() -> None:
    assert request_id(b"abc-DEF_1.2") == b"abc-DEF_1.2"
    for bad in (b"", b"x" * 129, b"a b", b"a\r\nb", "é".encode(), b"a/b"):
        rid = request_id(bad)
        assert rid != bad and len(rid) == 24 and int(rid, 16) >= 0
    assert request_id(None) != request_id(None)


def test_request_ids_of_forked_workers_differ() -> None:
    """Granian forks its workers from one process: each must make its own ids, not the same
    sequence as its siblings."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=lambda: writer.send([request_id(None) for _ in range(3)]))
    child.start()
    theirs = reader.recv()
    child.join(10)
    ours = [request_id(None) for _ in range(3)]
    assert len(set(ours) | set(theirs)) == 6
