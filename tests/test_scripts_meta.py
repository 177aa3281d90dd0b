"""Static checks of the Lua scripts: headers, key names, Redis 6.2 compatibility, package data."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from clawq.broker.keys import Keys
from clawq.broker.scripts import Scripts, _definitions, _lua_dir, _shake, load_specs

ROOT = Path(__file__).resolve().parent.parent
LUA = sorted((ROOT / "lua").glob("*.lua"))
CORE = (ROOT / "lua" / "lib" / "core.lua").read_text()


def test_every_script_file_is_loaded() -> None:
    names = {re.sub(r"-\d+$", "", p.stem) for p in LUA}
    assert names == set(load_specs())
    assert len(names) >= 11


@pytest.mark.parametrize("path", LUA, ids=lambda p: p.name)
def test_header_and_body(path: Path) -> None:
    text = path.read_text()
    header, body = text.split("]]", 1)
    assert header.startswith("--[[\n  " + re.sub(r"-\d+$", "", path.stem) + ": ")
    assert "ARGV[1]" in header and "Returns" in header
    assert body.lstrip().startswith("local rcall = redis.call")


@pytest.mark.parametrize("path", LUA, ids=lambda p: p.name)
def test_no_scans_no_functions_no_7_0_commands(path: Path) -> None:
    code = path.read_text() + CORE
    for banned in ('"KEYS"', '"SCAN"', '"FUNCTION"', '"FCALL"', '"ZINTERCARD"', '"LMPOP"', '"SINTERCARD"',
                   '"EXPIRETIME"', '"OBJECT"'):
        assert banned not in code.upper(), banned


@pytest.mark.parametrize("path", LUA, ids=lambda p: p.name)
def test_only_doctor_walks_every_board(path: Path) -> None:
    """A script never scans all boards (claims cost O(log N)); doctor, which checks everything, is the one
    exception. Walking a whole SET or HASH of boards or tasks is how a scan would creep back in."""
    if path.name.startswith("doctor-"):
        return
    spec = load_specs()[path.name.split("-")[0]]
    code = spec.source.upper()
    for banned in ('"SMEMBERS"', '"SSCAN"', '"HSCAN"', '"ZSCAN"'):  # `boards` is only added to and tested
        assert banned not in code, banned


def test_key_names_in_headers_exist_in_keys_module() -> None:
    keys = Keys("x")
    for spec in load_specs().values():
        for name in spec.key_names:
            assert hasattr(keys, name), (spec.name, name)


def test_keys_built_once_per_namespace_match_keys_module(redis_url: str) -> None:
    """Scripts builds each namespace's fixed keys once: two namespaces never share them, and the per-call
    keys (a task's, a model's, a provider's) are built from the call's ids."""
    client = redis.Redis.from_url(redis_url)
    for ns in ("alpha", "beta"):
        keys, scripts = Keys(ns), Scripts(client, Keys(ns))
        for spec in load_specs().values():
            for task_id in (7, 8):
                built = scripts.keys_for(spec.name, task_id=task_id, model="opus", provider="anthropic")
                want = [_expected(keys, n, task_id) for n in spec.key_names]
                assert built == want, spec.name


def _expected(keys: Keys, name: str, task_id: int) -> str:
    attr = getattr(keys, name)
    if name in ("task", "runs", "context", "lease"):
        return str(attr(task_id))
    if name == "cooldown":
        return str(attr("opus"))
    if name in ("breaker", "breaker_failures"):
        return str(attr("anthropic"))
    return str(attr)


def test_lua_key_builders_agree_with_keys_module() -> None:
    keys = Keys("ns")
    builders = dict(re.findall(r'local function (\w+)_key\(P, \w+\) return P \.\. (.+?) end', CORE))
    expected = {
        "board": keys.board("B"), "queue": keys.queue("B"), "done": keys.done("B"), "task": keys.task(7),
        "runs": keys.runs(7), "context": keys.context(7), "lease": keys.lease(7),
        "ready": keys.ready("c:x"), "cooldown": keys.cooldown("B"), "breaker": keys.breaker("B"),
        "breaker_failures": keys.breaker_failures("B"), "schedule": keys.schedule(7),
    }
    assert set(builders) == set(expected)
    for name, expr in builders.items():
        arg = "7" if name in ("task", "runs", "context", "lease", "schedule") else ("c:x" if name == "ready" else "B")
        parts = [p.strip() for p in expr.split("..")]
        built = keys.prefix + "".join(arg if not p.startswith('"') else p.strip('"') for p in parts)
        assert built == expected[name], name


def test_run_end_key_ranges_match_core() -> None:
    names = re.search(r"local RUN_END_KEYS = \{([^}]*)\}", CORE)
    assert names is not None
    run_end = re.findall(r'"(\w+)"', names.group(1))
    for spec in load_specs().values():
        if "keys_from(RUN_END_KEYS" in spec.source:
            assert list(spec.key_names[-len(run_end):]) == run_end, spec.name


def test_lua_dir_is_package_data() -> None:
    assert (_lua_dir() / "claim_task-15.lua").is_file()


@pytest.mark.slow
def test_scripts_load_from_an_installed_copy(tmp_path: Path, redis_url: str) -> None:
    """`pip install .` (not editable) ships the Lua files as package data; every script loads from there."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import redis, clawq.broker as broker, clawq.broker.scripts as s
        assert broker.__file__.startswith({str(target)!r}), broker.__file__
        assert all(str(p).startswith({str(target)!r}) for p in s._lua_dir().iterdir()), s._lua_dir()
        specs = s.load_specs()
        client = redis.Redis.from_url({redis_url!r})
        for spec in specs.values():
            client.script_load(spec.source)
        b = broker.Broker(client, "installed")
        b.connect()
        b.add("web", "t", chain="coding")
        print(len(specs), b.claim().task_id)
    """)
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(load_specs())), "1"]


def test_a_script_includes_only_the_core_definitions_it_uses() -> None:
    specs = load_specs()
    defined = re.findall(r"^local (?:function )?(\w+)", CORE, re.MULTILINE)
    for name in defined:  # each one is used somewhere, and included only where used
        holders = [s.name for s in specs.values() if re.search(rf"^local (?:function )?{name}\b", s.source, re.M)]
        assert holders, f"core's {name} is used by no script"
    heartbeat = specs["heartbeat"].source
    assert "local function active_run" in heartbeat and "local function reindex_board" not in heartbeat
    claim = specs["claim_task"].source
    for needed in ("pick_model", "check_model", "cooldown_end", "model_view", "hash_table", "note_inflight"):
        assert f"local function {needed}(" in claim, needed
    assert claim.index("local function hash_table(") < claim.index("local function model_view(")



def test_a_name_in_a_comment_or_a_string_is_no_use() -> None:
    """The shake follows uses in code only: a comment that names a definition does not include it (each
    included definition costs every call a closure), a `--` inside a string does not end the code."""
    lib = textwrap.dedent('''\
        -- big: pulls in much
        local function big() return 1 end
        -- see big(), which this does not call
        local function small() return "--[[ not a comment" .. helper() end --[[ nor big ]]
        local function helper() return "a -- b" end
        local function other() return big() end
    ''')
    defs = _definitions(lib)
    uses = {d.name: set(d.uses) & {d.name for d in defs} for d in defs}
    assert uses == {"big": set(), "small": {"helper"}, "helper": set(), "other": {"big"}}
    shaken = _shake(defs, "-- big() is mentioned here\nreturn small()")
    assert re.findall(r"local function (\w+)", shaken) == ["small", "helper"]


def test_no_script_includes_a_definition_only_a_comment_names() -> None:
    add = load_specs()["add_task"].source
    assert "local function end_run" not in add and "local function breaker_after" not in add
