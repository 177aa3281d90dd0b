"""``clawq agents check``: is every configured agent CLI installed, and does every board's workdir exist?

It works from the config loaded in Redis. For each model it finds the executable on PATH and runs it with
``--version`` only (stdin /dev/null, a time limit): it never sends a prompt, so it costs nothing. A model
without an ``agents`` entry is checked through the generic runner (``agent.command``'s executable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from clawq.broker.config import Config

from . import PRESETS

__all__ = ["check_agents", "check_table"]

VERSION_TIMEOUT_S = 15.0
_SECRET_PREFIXES = ("CLAWQ_", "REDIS_", "RQ_")


def _version(path: str) -> tuple[str | None, str | None]:
    """(first line of ``path --version``, error)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_PREFIXES)}
    try:
        proc = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT_S, env=env, check=False, errors="replace")
    except subprocess.TimeoutExpired:
        return None, f"--version did not answer within {VERSION_TIMEOUT_S:.0f}s"
    except OSError as err:
        return None, f"cannot run it: {err}"
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0:
        return (lines[0] if lines else None), f"--version exited {proc.returncode}"
    return (lines[0][:200] if lines else ""), None


def _executable(cfg: Config, model: str) -> tuple[str, str | None, str]:
    """(runner or preset, executable or None, the model name the CLI is given)."""
    entry = cfg.agents.get(model)
    if entry is not None:
        return entry.preset, entry.bin or PRESETS[entry.preset].default_bin, entry.model or model
    if cfg.agent.runner == "command":
        return "command", (cfg.agent.command[0] if cfg.agent.command else None), model
    return cfg.agent.runner, None, model


def _model_doc(cfg: Config, model: str) -> dict[str, Any]:
    runner, exe, name = _executable(cfg, model)
    doc: dict[str, Any] = {"runner": runner, "bin": exe, "cli_model": name, "path": None, "version": None,
                           "ok": True, "error": None}
    if runner in ("python", "simulated"):
        return doc  # nothing to find on PATH
    if exe is None:
        return {**doc, "ok": False, "error": "agent.command is not configured"}
    path = shutil.which(exe)
    if path is None:
        return {**doc, "ok": False, "error": f"{exe!r} is not on PATH"}
    version, error = _version(path)
    entry = cfg.agents.get(model)
    missing = [v for v in (entry.env_from.values() if entry else ()) if v not in os.environ]
    return {**doc, "path": path, "version": version, "ok": error is None, "error": error,
            "env_from_missing_here": missing}


def check_agents(cfg: Config) -> dict[str, Any]:
    """The check of every model and board: ``{"ok", "models": {...}, "boards": {...}}``."""
    models = {m: _model_doc(cfg, m) for m in sorted(cfg.models)}
    boards = {b: {"workdir": o.workdir, "exists": o.workdir is None or os.path.isdir(o.workdir)}
              for b, o in sorted(cfg.boards.items())}
    ok = all(d["ok"] for d in models.values()) and all(d["exists"] for d in boards.values())
    return {"ok": ok, "models": models, "boards": boards}


def check_table(doc: dict[str, Any]) -> str:
    """The check as two small tables for a terminal."""
    rows: list[tuple[str, ...]] = [("MODEL", "RUNNER", "BIN", "FOUND", "VERSION")]
    for model, d in doc["models"].items():
        found = d["path"] or ("-" if d["runner"] in ("python", "simulated") else "MISSING")
        version = d["version"] if d["error"] is None else f"{d['version'] or ''} ({d['error']})".strip()
        if d.get("env_from_missing_here"):
            version = f"{version or ''} (not set here: {', '.join(d['env_from_missing_here'])})".strip()
        rows.append((model, d["runner"], d["bin"] or "-", found, version or "-"))
    lines = _columns(rows)
    if doc["boards"]:
        lines.append("")
        lines += _columns([("BOARD", "WORKDIR", "EXISTS")] + [
            (b, d["workdir"] or "(worker's cwd)", "yes" if d["exists"] else "MISSING")
            for b, d in doc["boards"].items()])
    lines.append("")
    lines.append("all agents and workdirs found" if doc["ok"] else "something is missing (see above)")
    return "\n".join(lines)


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
