"""Notifiers: Telegram Bot API, a generic JSON webhook, and the log. A failing notifier never stops a run."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from clawq.broker.config import NotifyConfig

__all__ = ["LogNotifier", "Notifier", "Notifiers", "TelegramNotifier", "WebhookNotifier", "notifiers_from"]

log = logging.getLogger("clawq.notify")
_TIMEOUT_S = 5.0
_TELEGRAM_MAX = 4096


class Notifier(Protocol):
    def send(self, kind: str, text: str, data: Mapping[str, Any]) -> None: ...


def _post_json(url: str, doc: Mapping[str, Any]) -> None:
    body = json.dumps(doc).encode("utf-8")
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
        resp.read()


@dataclass
class LogNotifier:
    def send(self, kind: str, text: str, data: Mapping[str, Any]) -> None:
        log.info("[%s] %s", kind, text)


@dataclass
class TelegramNotifier:
    """``sendMessage`` of the Telegram Bot API (``api_base`` is configurable so tests use a local server)."""

    token: str
    chat_id: str
    api_base: str = "https://api.telegram.org"

    def send(self, kind: str, text: str, data: Mapping[str, Any]) -> None:
        url = f"{self.api_base.rstrip('/')}/bot{self.token}/sendMessage"
        _post_json(url, {"chat_id": self.chat_id, "text": text[:_TELEGRAM_MAX], "disable_web_page_preview": True})


@dataclass
class WebhookNotifier:
    url: str

    def send(self, kind: str, text: str, data: Mapping[str, Any]) -> None:
        _post_json(self.url, {"kind": kind, "text": text, **data})


@dataclass
class Notifiers:
    """Every configured notifier; ``sent`` keeps what was asked (the simulator's sink reads it)."""

    targets: list[Notifier] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)

    def send(self, kind: str, text: str, data: Mapping[str, Any] | None = None) -> None:
        doc = dict(data or {})
        self.sent.append({"kind": kind, "text": text, **doc})
        for target in self.targets:
            try:
                target.send(kind, text, doc)
            except Exception as err:  # a notifier never stops the queue: bad answers, timeouts, anything
                log.warning("notifier %s failed: %s", type(target).__name__, _redact(str(err)))


def _redact(text: str) -> str:
    token = os.environ.get("CLAWQ_TELEGRAM_BOT_TOKEN")
    return text.replace(token, "***") if token else text


def notifiers_from(cfg: NotifyConfig, env: Mapping[str, str] | None = None) -> Notifiers:
    """Build the notifiers the config asks for; Telegram needs its token (and chat id) in the environment."""
    env = os.environ if env is None else env
    targets: list[Notifier] = []
    if cfg.log:
        targets.append(LogNotifier())
    if cfg.telegram is not None:
        token = env.get(cfg.telegram.token_env)
        chat = cfg.telegram.chat_id or env.get("CLAWQ_TELEGRAM_CHAT_ID")
        if token and chat:
            targets.append(TelegramNotifier(token, chat, cfg.telegram.api_base))
        else:
            log.warning("telegram notifier configured but %s or the chat id is missing", cfg.telegram.token_env)
    if cfg.webhook is not None:
        targets.append(WebhookNotifier(cfg.webhook.url))
    return Notifiers(targets)
