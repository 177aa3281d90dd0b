"""clawq set-ups the benchmarks share: a config with large caps, fast task loading, claim/complete batches."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from clawq.broker import Broker, Claim, NothingToClaim, Outcome
from clawq.broker.config import Config
from clawq.broker.scripts import load_specs

__all__ = [
    "BIG_CAP",
    "CAPPED_MODEL",
    "COOLING_MODEL",
    "FOLLOW_UP",
    "MIX",
    "bench_config",
    "claim_batch",
    "claimable_share",
    "complete_all",
    "load_tasks",
    "new_broker",
    "plan",
    "script_sha",
]

BIG_CAP = 100_000
CAPPED_MODEL = "glm"  #: its model cap is 0: always "at its cap"
COOLING_MODEL = "opus"  #: cooled for hours before the measurements
MODELS = {
    "opus": "anthropic", "sonnet": "anthropic", "haiku": "anthropic", "codex": "openai", "gpt_mini": "openai",
    "gemini3": "google", "gemini3_flash": "google", "glm": "zai",
}
CHAINS = {
    "planning": ["opus", "codex", "gemini3"], "coding": ["codex", "sonnet", "gemini3"],
    "bulk": ["gemini3_flash", "glm"], "review": ["sonnet", "opus"], "cheap": ["glm", "gpt_mini"],
}
#: (chain, pinned model) of the tasks, by position: 5 chains and 3 pinned models = 8 chain keys; heads pinned to
#: the cooling model or the capped model are never claimable (2 of 8 boards), the chains fall back past them.
MIX: tuple[tuple[str, str], ...] = (
    ("planning", ""), ("coding", ""), ("bulk", ""), ("review", ""), ("cheap", ""),
    ("", COOLING_MODEL), ("", CAPPED_MODEL), ("", "codex"),
)
#: A completion that asks for a follow-up puts the task back at its board head: the queue keeps its size.
FOLLOW_UP = Outcome(needs_follow_up=True, next_prompt="again", summary="s")


def bench_config(**sections: dict[str, Any]) -> Config:
    """Large caps (no cap but the capped model's is reached), no night window, no notifications."""
    caps = {m: BIG_CAP for m in MODELS} | {CAPPED_MODEL: 0}
    doc: dict[str, Any] = {
        "queue": {"global_max_concurrent": BIG_CAP},
        "night_mode": None,
        "limits": {"model_max_inflight": caps, "provider_max_inflight": dict.fromkeys(MODELS.values(), BIG_CAP)},
        "followup": {"max_runs": 1000},
        "notify": {"log": False},
        "models": MODELS,
        "chains": CHAINS,
    }
    for name, value in sections.items():
        doc[name] = {**doc.get(name, {}), **value}
    return Config.model_validate(doc)


def new_broker(client: redis.Redis, namespace: str, config: Config, *, cool: bool = True) -> Broker:
    """A broker on a fresh namespace with ``config`` loaded (and the cooling model cooled for 6 h)."""
    broker = Broker(client, namespace)
    broker.connect()
    for spec in load_specs().values():  # no NOSCRIPT retry (a second EVALSHA) inside a measured phase
        client.script_load(spec.source)
    broker.load_config(config)
    if cool:
        broker.set_cooldown(COOLING_MODEL, 6 * 3600)
    return broker


def plan(boards: int, tasks: int) -> Iterator[tuple[str, str, str]]:
    """(board, chain, model) of each task: round-robin over the boards, the chain mix rotating per board."""
    for i in range(tasks):
        b, j = i % boards, i // boards
        chain, model = MIX[(b + j) % len(MIX)]
        yield f"b{b}", chain, model


def claimable_share() -> float:
    """Share of boards whose head can be claimed under :func:`bench_config` (heads on the blocked keys cannot)."""
    blocked = sum(1 for _, m in MIX if m in (COOLING_MODEL, CAPPED_MODEL))
    return (len(MIX) - blocked) / len(MIX)


def script_sha(client: redis.Redis, name: str) -> str:
    return str(client.script_load(load_specs()[name].source))


def load_tasks(broker: Broker, tasks: Iterable[tuple[str, str, str]], batch: int = 1000) -> int:
    """Add tasks with raw add_task EVALSHAs, ``batch`` per pipeline (empty prompts, title "t"); returns the count."""
    client, sha = broker.client, script_sha(broker.client, "add_task")
    keys = broker._scripts.keys_for("add_task")
    now = str(int(time.time() * 1000))
    pipe = client.pipeline(transaction=False)
    added = 0
    for board, chain, model in tasks:
        pipe.evalsha(sha, len(keys), *keys, broker.keys.prefix, now, "", board, "t", "", chain, model)
        if len(pipe) >= batch:
            added += _flush(pipe)
    return added + _flush(pipe)


def _flush(pipe: Any) -> int:
    replies = pipe.execute()
    bad = [r for r in replies if int(r[0]) != 0]
    if bad:
        raise RuntimeError(f"add_task refused: {bad[:3]}")
    return len(replies)


def claim_batch(broker: Broker, n: int) -> tuple[list[Claim], int]:
    """Up to ``n`` claims; returns them and how many claim calls were refused (NothingToClaim)."""
    claims: list[Claim] = []
    for _ in range(n):
        try:
            claims.append(broker.claim())
        except NothingToClaim:
            return claims, 1
    return claims, 0


def complete_all(broker: Broker, claims: Iterable[Claim], outcome: Outcome = FOLLOW_UP) -> None:
    for c in claims:
        broker.complete(c.task_id, c.run_id, outcome)
