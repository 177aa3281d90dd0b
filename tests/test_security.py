"""Security: TLS (rediss://), ACL users and passwords, secrets kept out of errors, logs, reports, agent
environments and RQ jobs, and command agents that never go through a shell.

Private servers only (never 127.0.0.1:6379): TLS and ACL servers are started by this module, on the system
``redis-server`` (TLS) and on every available binary (ACL).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import REDIS_BINARIES
from helpers import run_cli as _cli
from helpers import stop_group
from redis_servers import HOST, free_port
from test_cli import assert_one_line_error

from clawq.broker import Broker, Outcome, TaskStatus, parse_config, redact_url
from clawq.workers.runners import RunContext, agent_env, run_agent, run_command

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pw.42"
USER = "clawq"
ACL_ARGS = ["--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"]


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_ambient_clawq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAWQ_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("CLAWQ_NAMESPACE", raising=False)


class _Server:
    """A private redis-server with arbitrary arguments, ready when ``client_kwargs`` can PING it."""

    def __init__(self, binary: str, args: list[str], client_kwargs: dict[str, Any], *, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="clawq-sec-"))
        self.port = free_port()
        port_args = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.log = (self.dir / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, *port_args, "--bind", HOST, "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--dir", str(self.dir), *args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                text = (self.dir / "server.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"redis-server exited: {text[-2000:]}")
            try:
                with redis.Redis(host=HOST, port=self.port, socket_connect_timeout=0.5, **client_kwargs) as c:
                    c.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not come up") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)




def _cli_proc(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "clawq.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def _json_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code, out, err = _cli([*argv, "--json"], capsys)
    assert (code, err) == (0, ""), f"{argv} -> {code}: {err}"
    return json.loads(out)


def _flow(url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    """add, claim, complete, health, config show through the CLI on ``url``."""
    base = ["--redis-url", url, "--namespace", ns]
    added = _json_ok([*base, "add", "--board", "web", "--chain", "coding", "hello"], capsys)
    claim = _json_ok([*base, "claim"], capsys)
    assert claim["task_id"] == added["task_id"]
    done = _json_ok([*base, "complete", str(claim["task_id"]), claim["run_id"], "--summary", "ok"], capsys)
    assert done["status"] == "in_review"
    health = _json_ok([*base, "health"], capsys)
    assert "web" in health["boards"]
    code, out, err = _cli([*base, "config", "show"], capsys)
    assert (code, err) == (0, "") and "chains" in out


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Server, Path, Path]]:
    """(server, CA that signed its cert, an unrelated CA) — system redis-server with TLS."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    binary = REDIS_BINARIES.get("redis7")
    if binary is None:
        pytest.skip("no system redis-server")
    d = tmp_path_factory.mktemp("tls")
    ca, ca_key = _make_ca(d, "ca")
    other, _ = _make_ca(d, "other-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.cnf", cwd=d)
    args = ["--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    try:
        server = _Server(binary, args, {"ssl": True, "ssl_ca_certs": str(ca), "ssl_cert_reqs": "required"},
                         tls=True)
    except RuntimeError as err:
        if "tls" in str(err).lower() or "option" in str(err).lower():
            pytest.skip(f"redis-server is not built with TLS: {str(err)[-300:]}")
        raise
    try:
        yield server, ca, other
    finally:
        server.stop()


def _tls_url(port: int, ca: Path) -> str:
    return f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"


@pytest.fixture(scope="module", params=list(REDIS_BINARIES), ids=list(REDIS_BINARIES))
def acl_server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    """A server whose default user is off; only ``clawq``/PASSWORD may connect."""
    server = _Server(REDIS_BINARIES[request.param], ACL_ARGS, {"username": USER, "password": PASSWORD})
    try:
        yield server
    finally:
        server.stop()


def _acl_url(server: _Server, password: str = PASSWORD) -> str:
    return f"redis://{USER}:{password}@{HOST}:{server.port}/0"


@pytest.fixture
def acl_client(acl_server: _Server) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=acl_server.port, username=USER, password=PASSWORD)
    try:
        yield client
    finally:
        client.close()


def _ns() -> str:
    return "s" + uuid.uuid4().hex[:12]


def _values(client: redis.Redis, key: bytes, kind: bytes) -> list[bytes]:
    if kind == b"string":
        return [client.get(key) or b""]
    if kind == b"hash":
        return [b for kv in client.hgetall(key).items() for b in kv]
    if kind == b"list":
        return list(client.lrange(key, 0, -1))
    if kind == b"set":
        return list(client.smembers(key))
    if kind == b"zset":
        return [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
    if kind == b"stream":
        return [b for _, fields in client.xrange(key) for kv in fields.items() for b in kv]
    return []


def _all_values(client: redis.Redis) -> bytes:
    """Every key and value of the database, concatenated (to grep for secrets)."""
    parts: list[bytes] = []
    for key in client.scan_iter(count=1000):
        parts += [key, *_values(client, key, client.type(key))]
    return b"\n".join(parts)


# -- TLS -----------------------------------------------------------------------------------------------
def test_tls_cli_flow(tls_server: tuple[_Server, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, ca, _ = tls_server
    _flow(_tls_url(server.port, ca), _ns(), capsys)


def test_tls_broker_api(tls_server: tuple[_Server, Path, Path]) -> None:
    server, ca, _ = tls_server
    b = Broker.from_url(_tls_url(server.port, ca), _ns())
    try:
        tid = b.add("docs", "over tls", chain="bulk")
        c = b.claim()
        assert c.task_id == tid
        done = b.complete(tid, c.run_id, Outcome(summary="ok"))
        assert done.status is TaskStatus.IN_REVIEW
        assert b.health()["boards"]["docs"]["queue_depth"] == 0
    finally:
        b.close()


def test_tls_plain_connection_is_refused(tls_server: tuple[_Server, Path, Path]) -> None:
    server, _, _ = tls_server
    code, out, err = _cli_proc(["--redis-url", f"redis://127.0.0.1:{server.port}/0", "health"])
    assert_one_line_error(code, 1, out, err)


def test_tls_wrong_ca_is_one_line_error(tls_server: tuple[_Server, Path, Path]) -> None:
    server, _, other = tls_server
    code, out, err = _cli_proc(["--redis-url", _tls_url(server.port, other), "health"])
    assert_one_line_error(code, 1, out, err)
    assert "cannot reach Redis" in err


def test_tls_missing_ca_file_is_one_line_error(tls_server: tuple[_Server, Path, Path], tmp_path: Path) -> None:
    server, _, _ = tls_server
    code, out, err = _cli_proc(["--redis-url", _tls_url(server.port, tmp_path / "nope.crt"), "health"])
    assert code in (1, 2)
    assert_one_line_error(code, code, out, err)


# -- ACL users -----------------------------------------------------------------------------------------
def test_acl_cli_flow(acl_server: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    _flow(_acl_url(acl_server), _ns(), capsys)


def test_acl_broker_api(acl_server: _Server) -> None:
    b = Broker.from_url(_acl_url(acl_server), _ns())
    try:
        tid = b.add("web", "acl", chain="coding")
        c = b.claim()
        b.heartbeat(tid, c.run_id)
        assert b.complete(tid, c.run_id, Outcome(summary="ok")).status is TaskStatus.IN_REVIEW
        assert PASSWORD not in b._where
    finally:
        b.close()


def test_acl_default_user_is_really_off(acl_server: _Server) -> None:
    code, out, err = _cli_proc(["--redis-url", f"redis://{HOST}:{acl_server.port}/0", "health"])
    assert_one_line_error(code, 1, out, err)


@pytest.mark.parametrize("how", ["cli", "process"])
def test_acl_wrong_password_one_line_without_secret(acl_server: _Server, how: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "WrOnG-pass-77"
    argv = ["--redis-url", _acl_url(acl_server, wrong), "--namespace", _ns(), "health"]
    code, out, err = _cli(argv, capsys) if how == "cli" else _cli_proc(argv)
    assert_one_line_error(code, 1, out, err)
    assert wrong not in err + out and PASSWORD not in err + out


@pytest.mark.parametrize("url", [
    f"redis://{USER}:{PASSWORD}@127.0.0.1:1/0",
    f"redis://:{PASSWORD}@127.0.0.1:1/0",
    f"rediss://{USER}:{PASSWORD}@127.0.0.1:1/0",
    f"unix://{USER}:{PASSWORD}@/nonexistent/clawq.sock",
    f"redis://127.0.0.1:1/0?password={PASSWORD}",
], ids=["user-pass", "pass-only", "rediss", "unix", "query-password"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_unreachable_error_never_shows_password(url: str, as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--redis-url", url, "health"] + (["--json"] if as_json else [])
    code, out, err = _cli(argv, capsys)
    assert_one_line_error(code, 1, out, err)
    assert PASSWORD not in out + err


@pytest.mark.parametrize("url", [
    f"redis://{USER}:{PASSWORD}@127.0.0.1:notaport/0",
    f"redis://{USER}:{PASSWORD}@127.0.0.1:1/0?socket_timeout=abc",
    f"ftp://{USER}:{PASSWORD}@127.0.0.1/0",
    pytest.param(f"redis://127.0.0.1:1/0?password={PASSWORD}&socket_timeout=abc"),
    pytest.param(f"rediss://{USER}:{PASSWORD}@127.0.0.1:1/0?ssl_cert_reqs=bogus"),
], ids=["bad-port", "bad-query", "bad-scheme", "query-password", "bad-ssl-cert-reqs"])
def test_bad_url_error_never_shows_password(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["--redis-url", url, "health"], capsys)
    assert_one_line_error(code, 2, out, err)
    assert "bad Redis URL" in err
    assert PASSWORD not in out + err


def test_config_show_has_no_password(acl_server: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ([], ["--json"]):
        code, out, err = _cli(["--redis-url", _acl_url(acl_server), "--namespace", _ns(), "config", "show", *extra],
                              capsys)
        assert (code, err) == (0, "")
        assert PASSWORD not in out


# -- redact_url ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "expected"), [
    ("redis://u:pw@h:6379/0", "redis://u:***@h:6379/0"),
    ("redis://:pw@h", "redis://:***@h"),
    ("redis://:pw@h:1/2", "redis://:***@h:1/2"),
    ("redis://u@h/0", "redis://u@h/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("rediss://u:pw@h:6380/0?ssl_cert_reqs=required", "rediss://u:***@h:6380/0?ssl_cert_reqs=required"),
    ("unix://u:pw@/tmp/r.sock?db=1", "unix://u:***@/tmp/r.sock?db=1"),
    ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
    ("redis://u:p%40w@h/0", "redis://u:***@h/0"),
    ("redis://u:p@w@h/0", "redis://u:***@h/0"),
    ("not a url", "not a url"),
    ("", ""),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize("url", [
    "redis://h:6379/0?password=pw-SECRET",
    "unix:///tmp/r.sock?password=pw-SECRET&db=0",
    "redis://h:6379/0?db=0&password=pw-SECRET",
    "redis://h/0?password=pw-SECRET@x",
])
def test_redact_url_query_password(url: str) -> None:
    assert "pw-SECRET" not in redact_url(url)


def test_redact_url_keeps_host_with_at_in_query() -> None:
    assert redact_url("redis://u:p@h/0?x=y@z") == "redis://u:***@h/0?x=y@z"


# -- agents: environment and no shell ------------------------------------------------------------------
def test_agent_env_unit() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/home/x", "CLAWQ_REDIS_URL": f"redis://u:{PASSWORD}@h/0",
            "REDIS_PASSWORD": PASSWORD, "REDIS_URL": "redis://h", "RQ_REDIS_URL": "redis://h",
            "CLAWQ_API_TOKEN": "tok", "CLAWQ_TELEGRAM_BOT_TOKEN": "tg"}
    task = {"task_id": 7, "run_id": "r", "model": "codex", "provider": "openai", "board": "web", "run_count": 1}
    env = agent_env(task, base)
    assert env["PATH"] == "/usr/bin" and env["CLAWQ_TASK_ID"] == "7"
    assert not any(k.startswith(("REDIS_", "RQ_")) for k in env)
    assert "CLAWQ_REDIS_URL" not in env and "CLAWQ_API_TOKEN" not in env and "CLAWQ_TELEGRAM_BOT_TOKEN" not in env
    assert all(PASSWORD not in v for v in env.values())


_ARGV_AGENT = textwrap.dedent("""
    import json, sys
    open(sys.argv[1], "w").write(json.dumps(sys.argv[2:]))
    print(json.dumps({"status": "done", "summary": "argv ok"}))
""")


def test_command_agent_never_uses_a_shell(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(_ARGV_AGENT)
    record = tmp_path / "argv.json"
    evil = [f"; touch {tmp_path}/pwned1", f"$(touch {tmp_path}/pwned2)", f"`touch {tmp_path}/pwned3`",
            f"| touch {tmp_path}/pwned4", f"&& touch {tmp_path}/pwned5", "*", "$HOME", "a\nb"]
    ctx = RunContext(task={"task_id": 3, "run_id": "r-1", "model": "codex", "provider": "openai", "board": "web",
                           "run_count": 1}, timeout_s=30)
    result = run_command([sys.executable, str(script), str(record), *evil], ctx)
    assert type(result).__name__ == "Done", result
    assert json.loads(record.read_text()) == evil
    assert not list(tmp_path.glob("pwned*"))


def test_command_agent_with_shell_metachar_program_is_not_a_shell(tmp_path: Path) -> None:
    cfg = parse_config({"agent": {"runner": "command", "command": [f"true; touch {tmp_path}/pwned"]}})
    ctx = RunContext(task={"task_id": 3, "run_id": "r-1", "model": "codex", "provider": "openai", "board": "web",
                           "run_count": 1}, timeout_s=30)
    result = run_agent(cfg.agent, ctx)
    assert type(result).__name__ == "Failed" and result.cause == "agent_unreachable"  # type: ignore[union-attr]
    assert not (tmp_path / "pwned").exists()


# -- a real dispatcher + worker run against the ACL server ---------------------------------------------
_ENV_AGENT = textwrap.dedent("""
    import json, os, sys
    task = json.loads(sys.stdin.read())
    with open(os.path.join(sys.argv[1], f"env-{task['task_id']}.json"), "w") as fh:
        json.dump({"env": dict(os.environ), "argv": sys.argv, "task": task}, fh)
    print("agent log line")
    print(json.dumps({"status": "done", "summary": "env dumped"}))
""")


@pytest.mark.timeout(120)
def test_run_never_leaks_password(acl_server: _Server, acl_client: redis.Redis, tmp_path: Path) -> None:
    url, ns = _acl_url(acl_server), _ns()
    script = tmp_path / "agent.py"
    script.write_text(_ENV_AGENT)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    queue = f"q-{ns}"
    b = Broker.from_url(url, ns)
    procs: list[subprocess.Popen[bytes]] = []
    logs: dict[str, Path] = {}
    try:
        b.load_config(parse_config({"night_mode": None, "agent": {
            "runner": "command", "command": [sys.executable, str(script), str(dumps)], "queue": queue}}))
        ids = [b.add("web", "one", chain="coding"), b.add("docs", "two", chain="bulk")]
        env = {**os.environ, "CLAWQ_REDIS_URL": url, "CLAWQ_NAMESPACE": ns, "REDIS_PASSWORD": PASSWORD,
               "REDIS_URL": url, "RQ_REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
        for name, args in (("dispatch", ["dispatch", "--log-level", "DEBUG"]),
                           ("worker", ["worker", "--log-level", "DEBUG", "--name", f"w-{ns}"])):
            logs[name] = tmp_path / f"{name}.log"
            with logs[name].open("wb") as fh:
                procs.append(subprocess.Popen([sys.executable, "-m", "clawq.cli", *args], cwd=ROOT, env=env,
                                              stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(b.get_task(t).status is TaskStatus.IN_REVIEW for t in ids):
                break
            time.sleep(0.2)
        tasks = [b.get_task(t) for t in ids]
        assert [t.status for t in tasks] == [TaskStatus.IN_REVIEW] * 2, [logs[n].read_text()[-2000:] for n in logs]
    finally:
        for p in procs:
            stop_group(p)
        b.close()
    # the logs
    for name, path in logs.items():
        text = path.read_text(errors="replace")
        assert PASSWORD not in text, f"{name} log shows the password"
        assert "Traceback" not in text, text[-3000:]
    # the agent's environment
    for tid in ids:
        dumped = json.loads((dumps / f"env-{tid}.json").read_text())
        agent_environ: dict[str, str] = dumped["env"]
        assert "CLAWQ_REDIS_URL" not in agent_environ
        assert not [k for k in agent_environ if k.startswith(("REDIS_", "RQ_"))]
        assert not [k for k, v in agent_environ.items() if PASSWORD in v], "a variable holds the password"
        assert PASSWORD not in json.dumps(dumped["task"]) and PASSWORD not in json.dumps(dumped["argv"])
        assert agent_environ["CLAWQ_TASK_ID"] == str(tid)
    # the RQ jobs
    from rq.job import Job

    for task in tasks:
        for run in task.runs:
            job = Job.fetch(str(run["run_id"]), connection=acl_client)
            blob = json.dumps([job.args, job.kwargs, job.description, job.meta, job.func_name], default=str)
            assert PASSWORD not in blob and "redis://" not in blob and "rediss://" not in blob, blob
    # nothing stored in Redis holds the password (RQ worker records, job hashes, clawq keys)
    assert PASSWORD.encode() not in _all_values(acl_client)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_simulate_report_redacts_password(acl_server: _Server, acl_client: redis.Redis,
                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from clawq.sim.simulator import SimOptions, run_simulation

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = run_simulation(SimOptions(tasks=2, boards=1, seed=3, speed=200.0, time_limit_s=90,
                                       redis_url=_acl_url(acl_server), kill_worker=False, workers=1))
    try:
        assert report["redis"] == f"redis://{USER}:***@{HOST}:{acl_server.port}/0"
        assert PASSWORD not in json.dumps(report, default=str)
        for log in tmp_path.rglob("*.log"):
            assert PASSWORD not in log.read_text(errors="replace"), log
    finally:
        ns = report["namespace"]
        keys = list(acl_client.scan_iter(match=f"clawq:{{{ns}}}:*", count=1000))
        if keys:
            acl_client.delete(*keys)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_simulate_children_argv_has_no_password(acl_server: _Server, acl_client: redis.Redis,
                                                monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import clawq.sim.fleet as fleet
    import clawq.sim.simulator as sim

    seen: list[list[str]] = []
    real = subprocess.Popen

    def spy(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append([str(c) for c in cmd])
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fleet.subprocess, "Popen", spy)
    report = sim.run_simulation(sim.SimOptions(tasks=2, boards=1, seed=3, speed=200.0, time_limit_s=90,
                                               redis_url=_acl_url(acl_server), kill_worker=False, workers=1))
    ns = report["namespace"]
    keys = list(acl_client.scan_iter(match=f"clawq:{{{ns}}}:*", count=1000))
    if keys:
        acl_client.delete(*keys)
    assert seen
    assert not [c for c in seen if PASSWORD in " ".join(c)]
