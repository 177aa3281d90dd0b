"""Configuration: the spec YAML loads verbatim, defaults merge per field, validation names field and value,
``config show`` round-trips, the night window follows local time (DST too), and changes apply live."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import yaml
from conftest import FakeClock

from clawq import cli
from clawq.broker import Broker, Config, ConfigError, NothingToClaim, load_config_file, parse_config
from clawq.broker.config import NightModeConfig

SPEC_YAML = """\
queue:
  global_max_concurrent: 6
  one_in_progress_per_board: true
  pick_order: task_id_asc
limits:
  model_max_inflight: {opus: 2, codex: 2, sonnet: 2, gemini3: 3, gemini3_flash: 4, glm: 4}
  provider_max_inflight: {anthropic: 3, openai: 3, google: 4, zai: 4}
watchdog:
  stale_in_progress_minutes: 20
  heartbeat_grace_minutes: 3
  rate_limit_cooldown_minutes: 10
night_mode:
  timezone: America/Argentina/Buenos_Aires
  start: "23:00"
  end: "08:00"
  global_max_concurrent: 8
"""
BA = "America/Argentina/Buenos_Aires"
#: Every section of the config (the spec YAML gives only some; the rest keep their defaults).
SECTIONS = set(Config.model_fields)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def clawq(capsys: pytest.CaptureFixture[str], url: str, ns: str, *args: str) -> tuple[int, str, str]:
    """``clawq --redis-url url --namespace ns args`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--redis-url", url, "--namespace", ns, *args])
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out, err


def local_ts(zone: str, year: int, month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    """Epoch seconds of a wall-clock time in ``zone``."""
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone)).timestamp()


# -- loading and defaults ------------------------------------------------------------------------------
def test_spec_yaml_loads_verbatim(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path / "clawq.yaml", SPEC_YAML))
    spec = yaml.safe_load(SPEC_YAML)
    dumped = cfg.model_dump(mode="json")
    assert dumped["queue"] == spec["queue"]
    assert dumped["limits"] == spec["limits"]
    assert dumped["night_mode"] == spec["night_mode"]
    assert {k: dumped["watchdog"][k] for k in spec["watchdog"]} == spec["watchdog"]
    assert cfg.watchdog.failure_cooldown_minutes == 5 and cfg.watchdog.max_attempts == 3
    assert cfg == Config()  # the spec file is the default config


@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n"])
def test_an_empty_file_is_the_default(tmp_path: Path, text: str) -> None:
    assert load_config_file(write(tmp_path / "c.yaml", text)) == Config()


def test_a_missing_field_keeps_its_default_inside_a_given_section() -> None:
    cfg = parse_config({"watchdog": {"heartbeat_grace_minutes": 1}, "night_mode": {"global_max_concurrent": 2},
                        "queue": {"global_max_concurrent": 4}})
    assert cfg.watchdog.heartbeat_grace_minutes == 1
    assert cfg.watchdog.stale_in_progress_minutes == 20 and cfg.watchdog.rate_limit_cooldown_minutes == 10
    assert cfg.watchdog.failure_cooldown_minutes == 5 and cfg.watchdog.max_attempts == 3
    assert cfg.night_mode is not None
    assert (cfg.night_mode.timezone, cfg.night_mode.start, cfg.night_mode.end) == (BA, "23:00", "08:00")
    assert cfg.night_mode.global_max_concurrent == 2
    assert cfg.queue.global_max_concurrent == 4 and cfg.queue.pick_order == "task_id_asc"
    assert cfg.limits == Config().limits and cfg.chains == Config().chains


def test_a_given_map_replaces_the_default_map() -> None:
    cfg = parse_config({"limits": {"model_max_inflight": {"opus": 1}, "provider_max_inflight": {}}})
    assert cfg.limits.model_max_inflight == {"opus": 1}
    assert cfg.limits.provider_max_inflight == {}
    assert cfg.models == Config().models
    cfg = parse_config({"models": {"m1": "p1"}, "chains": {"only": ["m1"]},
                        "limits": {"model_max_inflight": {}, "provider_max_inflight": {"p1": 1}}})
    assert (cfg.models, cfg.chains) == ({"m1": "p1"}, {"only": ["m1"]})


def test_night_mode_can_be_switched_off() -> None:
    cfg = parse_config({"night_mode": None})
    assert cfg.night_mode is None
    assert cfg.global_cap_at(local_ts(BA, 2025, 6, 10, 3, 0)) == (6, False)


def test_minutes_may_be_fractional() -> None:
    cfg = parse_config({"watchdog": {"stale_in_progress_minutes": 0.05, "heartbeat_grace_minutes": 0.05,
                                     "rate_limit_cooldown_minutes": 0.5, "failure_cooldown_minutes": 0.01}})
    s = cfg.script_settings()
    assert (s["heartbeat_ms"], s["lease_ms"], s["cooldown_ms"], s["backoff_ms"]) == (3000, 6000, 30000, 600)


def test_json_round_trip_is_lossless() -> None:
    for cfg in (Config(), parse_config({"night_mode": None, "watchdog": {"stale_in_progress_minutes": 0.05}})):
        assert parse_config(json.loads(cfg.to_json())) == cfg


# -- validation ----------------------------------------------------------------------------------------
INVALID: list[tuple[str, Any, list[str]]] = [
    ("negative-model-cap", {"limits": {"model_max_inflight": {"opus": -1}}}, ["model_max_inflight", "opus", "-1"]),
    ("negative-provider-cap", {"limits": {"provider_max_inflight": {"google": -2}}},
     ["provider_max_inflight", "google", "-2"]),
    ("negative-global-cap", {"queue": {"global_max_concurrent": -1}}, ["queue.global_max_concurrent", "-1"]),
    ("negative-night-cap", {"night_mode": {"global_max_concurrent": -3}},
     ["night_mode.global_max_concurrent", "-3"]),
    ("unknown-timezone", {"night_mode": {"timezone": "Mars/Olympus"}}, ["night_mode.timezone", "Mars/Olympus"]),
    ("chain-unknown-model", {"chains": {"coding": ["codex", "gpt9"]}}, ["chains.coding", "gpt9"]),
    ("empty-chain", {"chains": {"coding": []}}, ["chains.coding"]),
    ("cap-for-model-without-provider", {"limits": {"model_max_inflight": {"gpt9": 1}}},
     ["model_max_inflight", "gpt9"]),
    ("models-map-drops-capped-model", {"models": {"opus": "anthropic"}}, ["model_max_inflight", "codex"]),
    ("start-equals-end", {"night_mode": {"start": "10:00", "end": "10:00"}}, ["night_mode", "start", "10:00"]),
    ("hhmm-24", {"night_mode": {"start": "24:00"}}, ["night_mode.start", "24:00"]),
    ("hhmm-no-pad", {"night_mode": {"end": "7:00"}}, ["night_mode.end", "7:00"]),
    ("hhmm-minute-60", {"night_mode": {"end": "07:60"}}, ["night_mode.end", "07:60"]),
    ("hhmm-seconds", {"night_mode": {"start": "23:00:00"}}, ["night_mode.start", "23:00:00"]),
    ("hhmm-unquoted-yaml", {"night_mode": {"start": 1380}}, ["night_mode.start", "1380"]),
    ("unknown-section", {"nightmode": {"start": "22:00"}}, ["nightmode"]),
    ("unknown-key", {"queue": {"global_max": 3}}, ["queue.global_max"]),
    ("unknown-watchdog-key", {"watchdog": {"stale_minutes": 3}}, ["watchdog.stale_minutes"]),
    ("int-is-text", {"queue": {"global_max_concurrent": "six"}}, ["queue.global_max_concurrent", "six"]),
    ("int-is-fraction", {"queue": {"global_max_concurrent": 6.5}}, ["queue.global_max_concurrent", "6.5"]),
    ("cap-map-is-list", {"limits": {"model_max_inflight": [1, 2]}}, ["limits.model_max_inflight", "[1, 2]"]),
    ("section-is-scalar", {"queue": 5}, ["queue", "5"]),
    ("chain-is-text", {"chains": {"coding": "codex"}}, ["chains.coding", "codex"]),
    ("provider-is-int", {"models": {"opus": 5}}, ["models.opus", "5"]),
    ("minutes-is-text", {"watchdog": {"stale_in_progress_minutes": "soon"}},
     ["watchdog.stale_in_progress_minutes", "soon"]),
    ("minutes-zero", {"watchdog": {"stale_in_progress_minutes": 0}}, ["watchdog.stale_in_progress_minutes", "0"]),
    ("minutes-nan", {"watchdog": {"rate_limit_cooldown_minutes": math.nan}},
     ["watchdog.rate_limit_cooldown_minutes", "nan"]),
    ("one-per-board-false", {"queue": {"one_in_progress_per_board": False}},
     ["queue.one_in_progress_per_board", "False"]),
    ("pick-order", {"queue": {"pick_order": "fifo"}}, ["queue.pick_order", "fifo"]),
    ("max-runs-zero", {"followup": {"max_runs": 0}}, ["followup.max_runs", "0"]),
    ("top-level-list", [1, 2], ["top level", "list"]),
]


@pytest.mark.parametrize(("doc", "names"), [pytest.param(d, n, id=i) for i, d, n in INVALID])
def test_invalid_config_names_field_and_value(doc: Any, names: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


@pytest.mark.parametrize(("doc", "names"), [pytest.param(d, n, id=i) for i, d, n in INVALID])
def test_invalid_config_file_exits_2_through_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str, r: redis.Redis, namespace: str,
    doc: Any, names: list[str],
) -> None:
    path = write(tmp_path / "c.yaml", yaml.safe_dump(doc))
    assert clawq(capsys, redis_url, namespace, "config", "show")[0] == 0
    before = r.get(f"clawq:{{{namespace}}}:config")
    code, out, err = clawq(capsys, redis_url, namespace, "config", "load", str(path))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("clawq: ") and err.count("\n") == 1
    assert all(name in err for name in names), err
    assert r.get(f"clawq:{{{namespace}}}:config") == before


@pytest.mark.parametrize("text", ["queue: [\n", "queue:\n\tglobal_max_concurrent: 3\n", "a: b: c\n", "- 1\n"])
def test_invalid_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config_file(write(tmp_path / "c.yaml", text))
    message = str(exc.value)
    assert "\n" not in message and ("c.yaml" in message or "top level" in message), message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config_file(tmp_path / "missing.yaml")


# Wrong scalar types that pydantic's lax mode converts instead of refusing.
@pytest.mark.parametrize("doc", [
    pytest.param({"queue": {"global_max_concurrent": True}}, id="bool-as-global-cap"),
    pytest.param({"limits": {"model_max_inflight": {"opus": True}}}, id="bool-as-model-cap"),
    pytest.param({"watchdog": {"stale_in_progress_minutes": True}}, id="bool-as-minutes"),
    pytest.param({"queue": {"global_max_concurrent": "6"}}, id="text-as-global-cap"),
    pytest.param({"watchdog": {"heartbeat_grace_minutes": "3"}}, id="text-as-minutes"),
])
def test_wrong_scalar_types_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_config(doc)


# -- the config through the CLI: show, round trip, extreme values ------------------------------------
def test_config_show_has_the_yaml_structure_and_round_trips(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str, r: redis.Redis, namespace: str
) -> None:
    spec = write(tmp_path / "spec.yaml", SPEC_YAML)
    code, _, err = clawq(capsys, redis_url, namespace, "config", "load", str(spec))
    assert (code, err) == (0, "")
    code, out, _ = clawq(capsys, redis_url, namespace, "config", "show", "--json")
    shown = json.loads(out)
    assert set(shown) == SECTIONS
    assert {"queue", "limits", "watchdog", "night_mode", "followup", "models", "chains"} <= SECTIONS
    for section, fields in yaml.safe_load(SPEC_YAML).items():
        assert {k: shown[section][k] for k in fields} == fields
    assert parse_config(shown) == load_config_file(spec)

    custom = {**shown, "night_mode": None, "watchdog": {**shown["watchdog"], "stale_in_progress_minutes": 0.05}}
    path = write(tmp_path / "shown.json", json.dumps(custom))
    assert clawq(capsys, redis_url, namespace, "config", "load", str(path))[0] == 0
    again = json.loads(clawq(capsys, redis_url, namespace, "config", "show", "--json")[1])
    assert again == custom
    code, text, _ = clawq(capsys, redis_url, namespace, "config", "show")
    assert code == 0 and yaml.safe_load(text) == custom


@pytest.mark.parametrize("text", [
    pytest.param("queue: {global_max_concurrent: 1000000000000000000000000000000}\n", id="global-cap-1e30"),
    pytest.param("limits: {model_max_inflight: {opus: 1000000000000000000000000000000}}\n", id="model-cap-1e30"),
    pytest.param("watchdog: {stale_in_progress_minutes: .inf}\n", id="stale-inf"),
    pytest.param("watchdog: {stale_in_progress_minutes: 1.0e+300}\n", id="stale-1e300"),
])
def test_extreme_values_are_refused_or_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str, r: redis.Redis, namespace: str,
    text: str,
) -> None:
    code, _, err = clawq(capsys, redis_url, namespace, "config", "load", str(write(tmp_path / "c.yaml", text)))
    if code == 2:
        assert err.startswith("clawq: ") and err.count("\n") == 1
        return
    assert (code, err) == (0, "")
    assert clawq(capsys, redis_url, namespace, "add", "--board", "b1", "--model", "opus", "t")[0] == 0
    code, _, err = clawq(capsys, redis_url, namespace, "claim", "--json")
    assert (code, err) == (0, ""), "a config that loads must let a task be claimed"


# -- the night window ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("hour", "minute", "second", "inside"), [
    (22, 59, 59, False), (23, 0, 0, True), (0, 0, 0, True), (3, 0, 0, True), (7, 59, 0, True),
    (7, 59, 59, True), (8, 0, 0, False), (12, 0, 0, False),
])
def test_wrapping_night_window_in_buenos_aires(hour: int, minute: int, second: int, inside: bool) -> None:
    night = Config().night_mode
    assert night is not None
    ts = local_ts(BA, 2025, 6, 10, hour, minute, second)
    assert night.contains(ts) is inside
    assert Config().global_cap_at(ts) == ((8, True) if inside else (6, False))


@pytest.mark.parametrize(("hour", "minute", "inside"), [
    (8, 59, False), (9, 0, True), (12, 30, True), (16, 59, True), (17, 0, False), (23, 30, False), (0, 0, False),
])
def test_non_wrapping_window(hour: int, minute: int, inside: bool) -> None:
    night = NightModeConfig(timezone=BA, start="09:00", end="17:00", global_max_concurrent=2)
    assert night.contains(local_ts(BA, 2025, 1, 15, hour, minute)) is inside


def test_window_is_local_time_not_utc() -> None:
    night = NightModeConfig()  # 23:00-08:00 in Buenos Aires (UTC-3)
    assert night.contains(datetime(2025, 6, 10, 2, 0, tzinfo=UTC).timestamp())  # 23:00 local
    assert not night.contains(datetime(2025, 6, 10, 1, 59, tzinfo=UTC).timestamp())  # 22:59 local
    assert not night.contains(datetime(2025, 6, 10, 11, 0, tzinfo=UTC).timestamp())  # 08:00 local


def _minutes_inside(night: NightModeConfig, start_utc: datetime, hours: int) -> int:
    return sum(night.contains((start_utc + timedelta(minutes=m)).timestamp()) for m in range(hours * 60))


def test_dst_spring_forward_in_berlin() -> None:
    # 2025-03-30 02:00 CET jumps to 03:00 CEST (01:00 UTC): the local hour 02:00-03:00 does not exist.
    gap = NightModeConfig(timezone="Europe/Berlin", start="02:00", end="03:00", global_max_concurrent=1)
    assert _minutes_inside(gap, datetime(2025, 3, 29, 12, 0, tzinfo=UTC), 24) == 0
    night = NightModeConfig(timezone="Europe/Berlin", start="23:00", end="08:00", global_max_concurrent=1)
    assert night.contains(datetime(2025, 3, 29, 22, 0, tzinfo=UTC).timestamp())  # 23:00 CET
    assert not night.contains(datetime(2025, 3, 29, 21, 59, tzinfo=UTC).timestamp())
    assert night.contains(datetime(2025, 3, 30, 5, 59, tzinfo=UTC).timestamp())  # 07:59 CEST
    assert not night.contains(datetime(2025, 3, 30, 6, 0, tzinfo=UTC).timestamp())  # 08:00 CEST
    assert _minutes_inside(night, datetime(2025, 3, 29, 12, 0, tzinfo=UTC), 24) == 8 * 60  # a short night


def test_dst_fall_back_in_berlin() -> None:
    # 2025-10-26 03:00 CEST falls back to 02:00 CET (01:00 UTC): the local hour 02:00-03:00 happens twice.
    twice = NightModeConfig(timezone="Europe/Berlin", start="02:00", end="03:00", global_max_concurrent=1)
    assert twice.contains(datetime(2025, 10, 26, 0, 30, tzinfo=UTC).timestamp())  # 02:30 CEST
    assert twice.contains(datetime(2025, 10, 26, 1, 30, tzinfo=UTC).timestamp())  # 02:30 CET
    assert not twice.contains(datetime(2025, 10, 26, 2, 0, tzinfo=UTC).timestamp())  # 03:00 CET
    assert _minutes_inside(twice, datetime(2025, 10, 25, 12, 0, tzinfo=UTC), 24) == 2 * 60
    night = NightModeConfig(timezone="Europe/Berlin", start="23:00", end="08:00", global_max_concurrent=1)
    assert _minutes_inside(night, datetime(2025, 10, 25, 12, 0, tzinfo=UTC), 24) == 10 * 60  # a long night


# -- live changes through the Broker -------------------------------------------------------------------
def _add_boards(broker: Broker, n: int, model: str = "glm") -> None:
    for i in range(n):
        broker.add(f"b{i}-{model}", "t", model=model)


def test_config_load_with_a_higher_cap_lets_more_claims_through(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, broker: Broker, redis_url: str
) -> None:
    broker.load_config(parse_config({"queue": {"global_max_concurrent": 1}, "night_mode": None}))
    _add_boards(broker, 4)
    broker.claim()
    with pytest.raises(NothingToClaim) as exc:
        broker.claim()
    assert exc.value.skip_reasons == {"global_cap": 3}
    assert broker.config().queue.global_max_concurrent == 1  # the broker has the old config cached

    higher = write(tmp_path / "c.yaml", "queue: {global_max_concurrent: 3}\nnight_mode: null\n")
    assert clawq(capsys, redis_url, broker.namespace, "config", "load", str(higher))[0] == 0
    broker.claim()
    broker.claim()
    with pytest.raises(NothingToClaim) as exc:
        broker.claim()
    assert exc.value.skip_reasons == {"global_cap": 1}


def test_a_higher_model_cap_applies_live(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, broker: Broker, redis_url: str
) -> None:
    _add_boards(broker, 3, model="opus")
    broker.claim()
    broker.claim()
    with pytest.raises(NothingToClaim) as exc:
        broker.claim()
    assert exc.value.skip_reasons == {"model_quota_reached": 1}
    text = "limits:\n  model_max_inflight: {opus: 3}\n  provider_max_inflight: {anthropic: 3}\n"
    assert clawq(capsys, redis_url, broker.namespace, "config", "load", str(write(tmp_path / "c.yaml", text)))[0] == 0
    assert broker.claim().model == "opus"


def test_a_model_without_a_cap_has_no_model_cap(broker: Broker) -> None:
    broker.load_config(parse_config({
        "queue": {"global_max_concurrent": 20}, "night_mode": None,
        "limits": {"model_max_inflight": {"opus": 1}, "provider_max_inflight": {}},
    }))
    _add_boards(broker, 6, model="sonnet")
    _add_boards(broker, 2, model="opus")
    claims = [broker.claim() for _ in range(7)]
    assert sorted(c.model for c in claims) == ["opus"] + ["sonnet"] * 6
    with pytest.raises(NothingToClaim) as exc:
        broker.claim()
    assert exc.value.skip_reasons == {"model_quota_reached": 1}
    health = broker.health()
    assert health["models"]["sonnet"]["cap"] is None and health["models"]["sonnet"]["inflight"] == 6
    assert health["providers"]["anthropic"] | {"breaker": None} == {"inflight": 7, "cap": None, "breaker": None}


def test_fractional_minutes_drive_the_lease(broker: Broker, clock: FakeClock) -> None:
    broker.load_config(parse_config({"watchdog": {"stale_in_progress_minutes": 0.05,
                                                  "heartbeat_grace_minutes": 0.05}}))
    broker.add("b1", "t", chain="coding")
    c = broker.claim()
    assert c.lease_deadline == pytest.approx(clock() + 6.0, abs=0.002)
    clock.advance(1)
    assert broker.heartbeat(c.task_id, c.run_id) == pytest.approx(clock() + 3.0, abs=0.002)
    clock.advance(3.1)
    assert broker.reap() == [c.task_id]


def test_the_night_cap_applies_by_the_clock(broker: Broker, clock: FakeClock) -> None:
    broker.load_config(parse_config({"queue": {"global_max_concurrent": 1},
                                     "night_mode": {"global_max_concurrent": 2}}))
    _add_boards(broker, 3)
    clock.t = local_ts(BA, 2025, 6, 10, 12, 0)
    assert broker.health()["global"] == {"max_concurrent": 1, "in_progress": 0, "night": False, "scheduled": 0}
    broker.claim()
    with pytest.raises(NothingToClaim):
        broker.claim()
    clock.t = local_ts(BA, 2025, 6, 11, 3, 0)
    assert broker.health()["global"] == {"max_concurrent": 2, "in_progress": 1, "night": True, "scheduled": 0}
    broker.claim()
    with pytest.raises(NothingToClaim) as exc:
        broker.claim()
    assert exc.value.skip_reasons == {"global_cap": 1}
