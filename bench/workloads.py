"""The routing benchmark's workloads (``just bench --routing``): chat requests and their open-loop
arrival times, all drawn from one seed so that every policy sees the very same traffic.

* ``shared``: groups of users; each group has a long system prompt of its own, each user a
  multi-turn conversation whose history grows (every turn appends the previous answer and a new
  user message). The answers are stand-ins of the requested length drawn from the seed: the load
  generator never parses a response, and a real client's history would hold the real answer.
* ``control``: the same requests with every message replaced by random text of the same length,
  so no two requests share a prefix (the control: routing by prefix has nothing to gain).
* ``skewed``: as ``shared``, but one group sends half of all traffic (the hot-spot guard).

Arrivals are a Poisson process (exponential gaps at the given rate), bounded in count and time:
requests start on that schedule whatever the completions (open loop).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORKLOADS = ("shared", "control", "skewed")

#: Pseudo-words for generated text (about 5 characters with the space, as in English prose).
_VOCAB = tuple(f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in ("n", "r", "s", "l", "t", "m"))


@dataclass(frozen=True)
class Shape:
    """The sizes of a workload (characters: the simulator estimates 4 per token)."""

    groups: int = 8
    users_per_group: int = 4
    system_chars: int = 8000
    user_chars: int = 400
    answer_tokens: int = 64
    max_turns: int = 6


@dataclass(frozen=True)
class Request:
    """One chat request of a workload: its messages, its answer length and its prefix group
    (``None`` for the control, whose requests share nothing)."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int
    group: int | None

    @property
    def prompt_chars(self) -> int:
        return sum(len(content) for _, content in self.messages)


def text(rng: random.Random, chars: int) -> str:
    """``chars`` characters of pseudo-words drawn from ``rng``."""
    words = rng.choices(_VOCAB, k=chars // 4 + 1)
    return " ".join(words)[:chars]


def arrivals(rng: random.Random, rate: float, count: int, seconds: float) -> list[float]:
    """Offsets in seconds of a Poisson process at ``rate`` per second: at most ``count`` of them,
    all before ``seconds``."""
    out: list[float] = []
    t = 0.0
    while len(out) < count:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        out.append(t)
    return out


class _Conversations:
    """Each group's system prompt and its users' conversations so far."""

    def __init__(self, rng: random.Random, shape: Shape) -> None:
        self.rng = rng
        self.shape = shape
        self.systems = [f"You are assistant {g}. " + text(rng, shape.system_chars) for g in range(shape.groups)]
        self.history: dict[tuple[int, int], list[tuple[str, str]]] = {}

    def next_turn(self, group: int, user: int) -> Request:
        """The user's next request: the history so far (the previous answer appended) and a new
        message; past ``max_turns`` the user starts a new conversation."""
        shape = self.shape
        key = (group, user)
        history = self.history.get(key)
        if history is None or len(history) >= 2 * shape.max_turns:
            history = [("system", self.systems[group])]
        else:
            history.append(("assistant", text(self.rng, shape.answer_tokens * 4)))
        history.append(("user", text(self.rng, shape.user_chars)))
        self.history[key] = history
        return Request(tuple(history), shape.answer_tokens, group)


def shared(seed: int, count: int, shape: Shape, *, hot_share: float = 0.0) -> list[Request]:
    """``count`` requests of the shared-prefix workload in arrival order: each picks a group
    (uniformly; or group 0 with probability ``hot_share`` and another one uniformly otherwise)
    and a user in it, and sends that user's next turn."""
    rng = random.Random(seed)
    convs = _Conversations(rng, shape)
    out = []
    for _ in range(count):
        if not hot_share:
            group = rng.randrange(shape.groups)
        else:
            group = 0 if rng.random() < hot_share or shape.groups == 1 else rng.randrange(1, shape.groups)
        out.append(convs.next_turn(group, rng.randrange(shape.users_per_group)))
    return out


def control(seed: int, count: int, shape: Shape) -> list[Request]:
    """The shared-prefix requests (same seed) with every message's text replaced by random text
    of the same length: the same prompt lengths, no shared prefix."""
    rng = random.Random(seed ^ 0x5EED)
    return [
        Request(tuple((role, text(rng, len(content))) for role, content in r.messages), r.max_tokens, None)
        for r in shared(seed, count, shape)
    ]


def build(name: str, seed: int, count: int, shape: Shape) -> list[Request]:
    """The named workload's ``count`` requests."""
    if name == "shared":
        return shared(seed, count, shape)
    if name == "control":
        return control(seed, count, shape)
    if name == "skewed":
        return shared(seed, count, shape, hot_share=0.5)
    raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")
