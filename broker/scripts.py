"""Load the Lua scripts once from package data and call each through one typed wrapper.

A script file is ``lua/<name>-<numkeys>.lua``. Its header lists ``KEYS[i] <name>``, where ``<name>`` is an
attribute of :class:`broker.keys.Keys`; the wrapper builds KEYS from those names, so the header is the one
place that says which key goes where, and the count is checked against the file name at import.
``--- @include "core"`` lines are replaced by the definitions of ``lua/lib/core.lua`` that the script uses,
directly or through other definitions, in the library's order (static text: no Lua is generated). Redis runs
a script's whole body on every call, so a library function a script never calls would still cost a closure
per call.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources.abc import Traversable
from typing import Any

import redis
from redis.commands.core import Script

from .keys import Keys

__all__ = ["ScriptSpec", "Scripts", "load_specs"]

_FILE_RE = re.compile(r"^(?P<name>[a-z_]+)-(?P<numkeys>\d+)\.lua$")
_KEY_RE = re.compile(r"^\s*KEYS\[(\d+)\]\s+(\w+)", re.MULTILINE)
_RANGE_RE = re.compile(r"^\s*KEYS\[(\d+)\.\.(\d+)\]", re.MULTILINE)
_INCLUDE_RE = re.compile(r'^--- @include "(\w+)"$', re.MULTILINE)
_RUN_END_RE = re.compile(r"local RUN_END_KEYS = \{([^}]*)\}", re.DOTALL)
_DEF_RE = re.compile(r"^local (?:function )?(\w+)")
_NAME_RE = re.compile(r"[A-Za-z_]\w*")

#: Keys that belong to one task or one model: built with that id / name.
_TASK_KEYS = frozenset({"task", "runs", "context", "lease"})
_MODEL_KEYS = frozenset({"cooldown"})
_PROVIDER_KEYS = frozenset({"breaker", "breaker_failures"})
_PER_CALL_KEYS = _TASK_KEYS | _MODEL_KEYS | _PROVIDER_KEYS


@dataclass(frozen=True)
class ScriptSpec:
    """One script: its name, the Keys attribute of each KEYS slot, and its full source."""

    name: str
    key_names: tuple[str, ...]
    source: str


def _lua_dir() -> Traversable:
    """The Lua files: package data of ``clawq.lua`` (the repository's ``lua/``), installed or editable."""
    return importlib.resources.files("clawq.lua")


def _lua_files(folder: Traversable) -> list[Traversable]:
    return sorted((f for f in folder.iterdir() if f.name.endswith(".lua")), key=lambda f: f.name)


def _run_end_keys(core: str) -> list[str]:
    match = _RUN_END_RE.search(core)
    if not match:
        raise RuntimeError("lua/lib/core.lua does not define RUN_END_KEYS")
    return re.findall(r'"(\w+)"', match.group(1))


@dataclass(frozen=True)
class _Def:
    """One top-level definition of a library: its name, its text (with the comment above it), the names it uses."""

    name: str
    text: str
    uses: frozenset[str]


def _definitions(lib: str) -> list[_Def]:
    """Split a library at its top-level ``local`` definitions; each keeps the comment lines just above it."""
    chunks: list[tuple[str, list[str]]] = []
    pending: list[str] = []
    for line in lib.splitlines(keepends=True):
        match = _DEF_RE.match(line)
        if match:
            chunks.append((match[1], [*pending, line]))
            pending = []
        elif (line.startswith("--") and not line.startswith("--[[")) or (pending and not line.strip()):
            pending.append(line)
        elif chunks:
            chunks[-1][1].extend([*pending, line])
            pending = []
        else:
            pending = []  # the library's header comment
    return [_Def(name, "".join(lines), frozenset(_NAME_RE.findall(_code("".join(lines)))) - {name})
            for name, lines in chunks]


def _code(lua: str) -> str:
    """``lua`` without its comments (``--`` to the end of the line, ``--[[ ... ]]``): a name a comment mentions
    is no use of it (a definition the shake keeps costs every call of the script a closure)."""
    out: list[str] = []
    quote, i, n = "", 0, len(lua)
    while i < n:
        ch = lua[i]
        if quote:
            if ch == "\\":
                out.append(lua[i:i + 2])
                i += 2
                continue
            if ch == quote or ch == "\n":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif lua.startswith("--", i):
            if lua.startswith("--[[", i):
                close = lua.find("]]", i + 4)
                i = n if close < 0 else close + 2
            else:
                eol = lua.find("\n", i)
                i = n if eol < 0 else eol
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _shake(defs: list[_Def], text: str) -> str:
    """The definitions ``text`` needs, transitively, in library order."""
    by_name = {d.name: d for d in defs}
    needed: set[str] = set()
    todo = [n for n in set(_NAME_RE.findall(_code(text))) if n in by_name]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(n for n in by_name[name].uses if n in by_name)
    return "".join(d.text for d in defs if d.name in needed)


def _key_names(header: str, numkeys: int, run_end: list[str], fname: str) -> tuple[str, ...]:
    slots: dict[int, str] = {int(i): name for i, name in _KEY_RE.findall(header)}
    for first, last in _RANGE_RE.findall(header):
        for offset, name in enumerate(run_end):
            slots[int(first) + offset] = name
        if int(last) - int(first) + 1 != len(run_end):
            raise RuntimeError(f"{fname}: KEYS[{first}..{last}] does not match RUN_END_KEYS")
    names = tuple(slots[i] for i in sorted(slots))
    if sorted(slots) != list(range(1, numkeys + 1)):
        raise RuntimeError(f"{fname}: header lists KEYS {sorted(slots)}, file name says {numkeys}")
    return names


def _spec(path: Traversable, libs: dict[str, list[_Def]], run_end: list[str]) -> ScriptSpec:
    match = _FILE_RE.match(path.name)
    if not match:
        raise RuntimeError(f"bad script file name {path.name}")
    text = path.read_text(encoding="utf-8")
    header = text.split("]]", 1)[0]
    names = _key_names(header, int(match["numkeys"]), run_end, path.name)
    body = _INCLUDE_RE.sub("", text)
    source = _INCLUDE_RE.sub(lambda m: _shake(libs[m.group(1)], body), text)
    return ScriptSpec(match["name"], names, source)


@cache
def load_specs() -> dict[str, ScriptSpec]:
    """Every script of the package, by name (read once per process)."""
    root = _lua_dir()
    texts = {p.name.removesuffix(".lua"): p.read_text(encoding="utf-8") for p in _lua_files(root / "lib")}
    run_end = _run_end_keys(texts["core"])
    libs = {name: _definitions(text) for name, text in texts.items()}
    specs = [_spec(p, libs, run_end) for p in _lua_files(root)]
    return {s.name: s for s in specs}


def _key(keys: Keys, name: str, task_id: int | None, model: str | None, provider: str | None = None) -> str:
    attr: Any = getattr(keys, name)
    if name in _TASK_KEYS:
        if task_id is None:
            raise ValueError(f"key {name} needs a task id")
        return str(attr(task_id))
    if name in _PROVIDER_KEYS:
        if provider is None:
            raise ValueError(f"key {name} needs a provider")
        return str(attr(provider))
    if name in _MODEL_KEYS:
        if model is None:
            raise ValueError(f"key {name} needs a model")
        return str(attr(model))
    return str(attr)


class Scripts:
    """The registered scripts of one client and namespace."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._specs = load_specs()
        self._scripts: dict[str, Script] = {
            name: client.register_script(spec.source) for name, spec in self._specs.items()
        }
        # The namespace's own keys never change: each script's are built once, here (a complete names 21).
        # None marks a key built per call (a task's, a model's, a provider's).
        self._fixed: dict[str, list[str | None]] = {
            name: [None if n in _PER_CALL_KEYS else _key(keys, n, None, None) for n in spec.key_names]
            for name, spec in self._specs.items()
        }

    def keys_for(
        self, name: str, *, task_id: int | None = None, model: str | None = None, provider: str | None = None
    ) -> list[str]:
        names = self._specs[name].key_names
        return [
            k if k is not None else _key(self._keys, n, task_id, model, provider)
            for k, n in zip(self._fixed[name], names, strict=True)
        ]

    def call(
        self,
        name: str,
        args: Sequence[str | int | float],
        *,
        task_id: int | None = None,
        model: str | None = None,
        provider: str | None = None,
    ) -> list[Any]:
        """Run script ``name`` (EVALSHA, reloaded on NOSCRIPT) and return its reply as a list."""
        keys = self.keys_for(name, task_id=task_id, model=model, provider=provider)
        reply: Any = self._scripts[name](keys=keys, args=list(args))
        return [_text(x) for x in reply]


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value

