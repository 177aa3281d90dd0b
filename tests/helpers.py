"""Small helpers shared by the script-level tests."""

from __future__ import annotations

from typing import Any

from broker import Broker


def rc(broker: Broker) -> Any:
    """The broker's client, untyped: redis-py's reply types are unions of bytes and str."""
    return broker.client


def ms(seconds: float) -> int:
    return int(seconds * 1000)
