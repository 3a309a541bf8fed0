"""Seeded routing workloads, shared by the live router benchmark and the cluster simulator.

- ``chat``: multi-turn chat; each session opens with one of a few system prompts chosen by Zipf popularity,
  then alternates user turns and assistant replies (the replies are part of the log, so the workload is the
  same for every router; the engine's own output is not fed back).
- ``hot``: the same shape with a steeper Zipf over more prompts: a few system prompts far more popular.
- ``rag``: single-turn questions over a shared instruction plus one retrieved document chosen by Zipf
  popularity from a corpus.

A workload is a list of sessions; a session's turns run one after another (each waits for the previous
turn's reply plus a think time); sessions start by a Poisson process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Turn", "Session", "make_workload", "WORKLOADS"]

WORKLOADS = ("chat", "rag", "hot")


@dataclass
class Turn:
    """One request: the full chat history so far, ending with a user message."""

    session: str
    index: int
    messages: list[dict[str, str]]
    max_tokens: int
    group: int  # the system prompt / document it shares (for reporting)


@dataclass
class Session:
    id: str
    start_s: float
    think_s: float
    turns: list[Turn] = field(default_factory=list)


def _vocabulary(rng: random.Random, n: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def _text(rng: random.Random, vocab: list[str], words: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(words)) + "."


def _zipf_choice(rng: random.Random, n: int, a: float) -> int:
    weights = [1.0 / (k + 1) ** a for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def make_workload(
    kind: str,
    seed: int = 0,
    sessions: int = 24,
    turns: int = 3,
    groups: int | None = None,
    zipf_a: float | None = None,
    prefix_words: int = 250,
    user_words: int = 25,
    reply_words: int = 25,
    max_tokens: int = 16,
    sessions_per_s: float = 2.0,
    think_s: float = 0.5,
    tag: str = "",
) -> list[Session]:
    """Build a seeded workload (`kind` in WORKLOADS); `groups` = system prompts (chat, hot) or documents (rag).
    `tag` opens every prompt: runs with different tags share no cached prefix, so one cluster can replay the
    same workload several times (one per router) without resetting its caches."""
    if kind not in WORKLOADS:
        raise ValueError(f"unknown workload {kind!r}; one of {WORKLOADS}")
    rng = random.Random(seed)
    vocab = _vocabulary(random.Random(seed + 1))
    if kind == "rag":
        groups = groups or 8
        zipf_a = 1.1 if zipf_a is None else zipf_a
        turns = 1
        instruction = f"{tag}Answer from the document. " + _text(rng, vocab, 40)
    elif kind == "hot":
        groups = groups or 8
        zipf_a = 2.0 if zipf_a is None else zipf_a
    else:
        groups = groups or 4
        zipf_a = 1.1 if zipf_a is None else zipf_a
    prefixes = [_text(rng, vocab, prefix_words) for _ in range(groups)]
    out: list[Session] = []
    t = 0.0
    for s in range(sessions):
        t += rng.expovariate(sessions_per_s)
        g = _zipf_choice(rng, groups, zipf_a)
        sess = Session(id=f"{kind}-{seed}-{s}", start_s=t, think_s=think_s)
        if kind == "rag":
            messages = [
                {"role": "system", "content": instruction},
                {"role": "user", "content": f"Document:\n{prefixes[g]}\n\nQuestion: {_text(rng, vocab, user_words)}"},
            ]
            sess.turns.append(Turn(sess.id, 0, messages, max_tokens, g))
        else:
            history = [{"role": "system", "content": tag + prefixes[g]}]
            for k in range(turns):
                history = history + [{"role": "user", "content": _text(rng, vocab, user_words)}]
                sess.turns.append(Turn(sess.id, k, list(history), max_tokens, g))
                history = history + [{"role": "assistant", "content": _text(rng, vocab, reply_words)}]
        out.append(sess)
    return out
