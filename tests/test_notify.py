"""Notifiers: Telegram sendMessage and a JSON webhook against a local HTTP server; failures never raise."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from clawq.broker import Broker
from clawq.broker.config import Config, NotifyConfig, TelegramConfig, WebhookConfig
from clawq.workers import notify
from clawq.workers.dispatcher import Dispatcher
from clawq.workers.notify import LogNotifier, Notifiers, TelegramNotifier, WebhookNotifier, notifiers_from

TOKEN = "123456:ABC-secret-token"


@dataclass
class Hits:
    """What the local server received."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    got: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    hits: Hits

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.hits.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(self.hits.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')
        self.hits.got.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, Hits]]:
    """A local HTTP server on 127.0.0.1 (ephemeral port): (base URL, what it received)."""
    hits = Hits()
    handler = type("Handler", (_Handler,), {"hits": hits})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def refused_url() -> str:
    """A loopback URL nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


# -- Telegram --------------------------------------------------------------------------------------
def test_telegram_send_message(server: tuple[str, Hits]) -> None:
    base, hits = server
    TelegramNotifier(TOKEN, "-10042", api_base=base + "/").send("summary", "clawq day: cap 3", {"x": 1})
    assert len(hits.requests) == 1
    req = hits.requests[0]
    assert req["path"] == f"/bot{TOKEN}/sendMessage"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["body"]["chat_id"] == "-10042"
    assert req["body"]["text"] == "clawq day: cap 3"


def test_telegram_text_is_cut_to_the_api_limit(server: tuple[str, Hits]) -> None:
    base, hits = server
    TelegramNotifier(TOKEN, "1", api_base=base).send("alert", "é" * 5000, {})
    assert hits.requests[0]["body"]["text"] == "é" * 4096


# -- webhook ---------------------------------------------------------------------------------------
def test_webhook_posts_json(server: tuple[str, Hits]) -> None:
    base, hits = server
    WebhookNotifier(base + "/hooks/clawq").send("in_review", "task 3 needs review", {"task_id": 3, "board": "web"})
    req = hits.requests[0]
    assert req["path"] == "/hooks/clawq"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["body"] == {"kind": "in_review", "text": "task 3 needs review", "task_id": 3, "board": "web"}


# -- failures never raise --------------------------------------------------------------------------
def test_connection_refused_does_not_raise_and_others_still_get_it(server: tuple[str, Hits],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    base, hits = server
    sink = Notifiers([TelegramNotifier(TOKEN, "1", api_base=refused_url().rsplit("/", 1)[0]),
                      WebhookNotifier(refused_url()), WebhookNotifier(base + "/ok")])
    with caplog.at_level(logging.WARNING, logger="clawq.notify"):
        sink.send("summary", "hello", {"n": 1})
    assert sink.sent == [{"kind": "summary", "text": "hello", "n": 1}]
    assert [r["path"] for r in hits.requests] == ["/ok"]
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 2
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("status", [500, 404, 429])
def test_http_error_status_does_not_raise(server: tuple[str, Hits], status: int) -> None:
    base, hits = server
    hits.status = status
    Notifiers([TelegramNotifier(TOKEN, "1", api_base=base), WebhookNotifier(base + "/x")]).send("alert", "t")
    assert len(hits.requests) == 2


def test_a_server_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "_TIMEOUT_S", 0.3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        Notifiers([WebhookNotifier(f"http://127.0.0.1:{sock.getsockname()[1]}/slow")]).send("alert", "t")


class _Garbage:
    """A TCP server on 127.0.0.1 that answers every connection with ``reply`` and closes it."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("reply", [b"HELLO, not http\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\""],
                         ids=["bad-status-line", "incomplete-read"])
def test_a_garbage_answer_does_not_raise(reply: bytes) -> None:
    garbage = _Garbage(reply)
    try:
        Notifiers([WebhookNotifier(garbage.url)]).send("alert", "t")
    finally:
        garbage.close()


def test_a_garbage_answer_does_not_stop_the_dispatcher(broker: Broker) -> None:
    garbage = _Garbage(b"SSH-2.0-OpenSSH_9.6\r\n")
    try:
        broker.load_config(Config.model_validate({"night_mode": None, "notify": {
            "log": False, "webhook": {"url": garbage.url}}}))
        broker.add("web", "t", chain="coding")
        claims: list[Any] = []
        assert Dispatcher(broker, claims.append).step() == 1
    finally:
        garbage.close()


# -- building notifiers from the config ------------------------------------------------------------
def test_notifiers_from_config_with_env_token_and_chat(server: tuple[str, Hits]) -> None:
    base, hits = server
    cfg = NotifyConfig(telegram=TelegramConfig(api_base=base), webhook=WebhookConfig(url=base + "/hook"))
    sink = notifiers_from(cfg, {"CLAWQ_TELEGRAM_BOT_TOKEN": TOKEN, "CLAWQ_TELEGRAM_CHAT_ID": "777"})
    kinds = [type(t) for t in sink.targets]
    assert kinds == [LogNotifier, TelegramNotifier, WebhookNotifier]
    sink.send("summary", "one line")
    assert sorted(r["path"] for r in hits.requests) == sorted([f"/bot{TOKEN}/sendMessage", "/hook"])
    tg = next(r for r in hits.requests if r["path"].endswith("sendMessage"))
    assert tg["body"]["chat_id"] == "777" and tg["body"]["text"] == "one line"


def test_notifiers_from_config_chat_id_and_custom_token_env() -> None:
    cfg = NotifyConfig(log=False, telegram=TelegramConfig(chat_id="55", token_env="MY_BOT_TOKEN"))
    sink = notifiers_from(cfg, {"MY_BOT_TOKEN": "t0k", "CLAWQ_TELEGRAM_CHAT_ID": "66"})
    assert sink.targets == [TelegramNotifier("t0k", "55", "https://api.telegram.org")]


@pytest.mark.parametrize("env", [{}, {"CLAWQ_TELEGRAM_BOT_TOKEN": TOKEN}, {"CLAWQ_TELEGRAM_CHAT_ID": "1"}])
def test_telegram_without_token_or_chat_is_left_out(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="clawq.notify"):
        sink = notifiers_from(NotifyConfig(log=False, telegram=TelegramConfig()), env)
    assert sink.targets == []
    assert "telegram" in caplog.text
    assert TOKEN not in caplog.text


def test_notifiers_from_default_config_is_the_log_only() -> None:
    assert [type(t) for t in notifiers_from(NotifyConfig(), {}).targets] == [LogNotifier]
    assert notifiers_from(NotifyConfig(log=False), {}).targets == []


def test_log_notifier_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="clawq.notify"):
        Notifiers([LogNotifier()]).send("agent_not_ready", "claims held")
    assert "[agent_not_ready] claims held" in caplog.text


# -- the dispatcher builds its notifiers from the namespace's config --------------------------------
def test_dispatcher_summary_reaches_telegram(broker: Broker, server: tuple[str, Hits],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, hits = server
    monkeypatch.setenv("CLAWQ_TELEGRAM_BOT_TOKEN", TOKEN)
    broker.load_config(Config.model_validate({
        "night_mode": None, "queue": {"global_max_concurrent": 3},
        "notify": {"log": False, "telegram": {"chat_id": "-42", "api_base": base}},
    }))
    broker.add("web", "a task", chain="coding")
    broker.add("web", "another", chain="coding")
    claims: list[Any] = []
    d = Dispatcher(broker, claims.append)
    assert d.step() == 1
    assert hits.got.wait(5)
    assert len(hits.requests) == 1
    req = hits.requests[0]
    assert req["path"] == f"/bot{TOKEN}/sendMessage" and req["body"]["chat_id"] == "-42"
    text = req["body"]["text"]
    assert "day" in text and "cap 3" in text and "1 in progress" in text and "1 queued" in text


def test_a_running_dispatcher_picks_up_a_new_notify_config(redis_url: str, r: Any, namespace: str,
                                                           server: tuple[str, Hits]) -> None:
    base, hits = server
    admin, own = Broker.from_url(redis_url, namespace), Broker.from_url(redis_url, namespace)
    stop = threading.Event()
    try:
        admin.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False}}))
        d = Dispatcher(own, lambda claim: None)
        loop = threading.Thread(target=d.run, args=(stop,), daemon=True)
        loop.start()
        time.sleep(0.3)
        admin.load_config(Config.model_validate({"night_mode": None, "notify": {
            "log": False, "webhook": {"url": base + "/hook"}}}))
        time.sleep(0.5)  # the dispatcher has read config_loaded
        admin.add("web", "t", chain="coding")  # claimed at once; the queue is active: a summary goes out
        assert hits.got.wait(3), "the summary did not reach the webhook of the new config"
    finally:
        stop.set()
        loop.join(5)
        admin.close()
        own.close()
