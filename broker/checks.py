"""Input checks shared by every front end: task ids, run ids, board names and free text.

The broker API, the outcome model and the HTTP layer all check with these functions, so a value is judged
the same way wherever it comes in. The ``*_problem`` functions say what is wrong (None when nothing is), for
validators that raise their own error type; the ``check_*`` functions raise :class:`InputError`.
"""

from __future__ import annotations

import re

from .errors import InputError
from .keys import BOARD_RE, NAMESPACE_RE

__all__ = [
    "MAX_TASK_ID",
    "MAX_TEXT_BYTES",
    "MAX_TITLE_BYTES",
    "check_board",
    "check_namespace",
    "check_run_id",
    "check_task_id",
    "check_text",
    "run_id_problem",
    "text_problem",
]

#: Task ids stay below 10**14: Lua prints larger numbers in exponent form (and JSON would lose digits).
MAX_TASK_ID = 10**14
#: Largest prompt, next_prompt, summary or message accepted, in bytes of UTF-8.
MAX_TEXT_BYTES = 256 * 1024
#: Largest task title, in bytes of UTF-8.
MAX_TITLE_BYTES = 1024


def text_problem(name: str, value: str, limit: int = MAX_TEXT_BYTES, *, required: bool = False) -> str | None:
    """What is wrong with a free text ``value`` (empty when required, too long, a NUL), or None."""
    if required and not value.strip():
        return f"{name} must not be empty"
    if len(value.encode("utf-8")) > limit:
        return f"{name} is larger than {limit} bytes"
    if "\x00" in value:
        return f"{name} contains a NUL character"
    return None


def check_text(name: str, value: str, limit: int = MAX_TEXT_BYTES, *, required: bool = False) -> None:
    problem = text_problem(name, value, limit, required=required)
    if problem is not None:
        raise InputError(problem)


#: A UUID in canonical form: what ``str(uuid.UUID(x)) == x`` accepts, matched without building a UUID (a
#: pipelined complete checks one per item).
_RUN_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def run_id_problem(run_id: object) -> str | None:
    """None when ``run_id`` is a UUID in canonical (36-character, lowercase) form, else what is wrong."""
    ok = isinstance(run_id, str) and _RUN_ID_RE.fullmatch(run_id) is not None
    return None if ok else f"bad run id {run_id!r}: a UUID in canonical 36-character form"


def check_run_id(run_id: str) -> None:
    problem = run_id_problem(run_id)
    if problem is not None:
        raise InputError(problem)


def check_task_id(task_id: int) -> None:
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 1 <= task_id < MAX_TASK_ID:
        raise InputError(f"bad task id {task_id!r}: a positive integer below 10**14")


def check_board(board: str) -> None:
    if not isinstance(board, str) or not BOARD_RE.match(board):
        shown = repr(board) if len(str(board)) <= 80 else repr(str(board)[:80]) + f"… ({len(board)} chars)"
        raise InputError(f"bad board name {shown}: use 1-64 letters, digits, '.', '_' or '-'")


def check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
        raise InputError(f"bad namespace {namespace!r}: use 1-64 letters, digits, '.', '_' or '-'")
