"""Request bodies read the way Rails reads params: a JSON object, or a form with nested names.

ClawTrol's clients post either ``application/json`` or ``application/x-www-form-urlencoded`` (the Rails
default), so every route that takes a body here takes both:

- ``a=1`` is ``{"a": "1"}``; a repeated plain name keeps its last value;
- ``a[]=x&a[]=y`` is ``{"a": ["x", "y"]}``; ``a[]`` alone (no ``=``) is an empty list;
- ``a[b]=1`` is ``{"a": {"b": "1"}}``, nested to any depth up to :data:`MAX_DEPTH`;
- ``a[][b]=1&a[][c]=2`` is ``{"a": [{"b": "1", "c": "2"}]}`` (a new element starts when a name repeats);
- a name without ``=`` is null.

Form values stay text; the models cast them (``workers.clawtrol``). A form body that is itself a JSON object
(``curl -d '{…}'`` without a Content-Type header) is read as JSON. No body is an empty object.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

__all__ = ["FORM", "MAX_DEPTH", "MAX_FIELDS", "BodyError", "parse_body", "parse_form"]

FORM = "application/x-www-form-urlencoded"
#: Nesting levels of a form name (``a[b][c]`` has 3).
MAX_DEPTH = 16
#: Fields of one form body.
MAX_FIELDS = 1000


class BodyError(ValueError):
    """A body that is neither a JSON object nor a well-formed form (the message is one line)."""

    def __init__(self, message: str, *, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The params of a request body (see the module docstring); raises :class:`BodyError`."""
    media = _media_type(content_type)
    if not raw.strip():
        return {}
    if media == FORM and not raw.lstrip().startswith(b"{"):
        return parse_form(raw)
    if media in ("", FORM, "application/json") or media.endswith("+json"):
        return _json_object(raw)
    raise BodyError(f"unsupported Content-Type {media!r}: send application/json or {FORM}", status=415)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:
        detail = " ".join(str(err).split()) if isinstance(err, ValueError) else "nested too deeply"
        raise BodyError(f"body is not valid JSON: {detail}") from None
    if not isinstance(doc, dict):
        raise BodyError("body: send a JSON object (Content-Type: application/json)")
    return doc


def parse_form(raw: bytes) -> dict[str, Any]:
    """A URL-encoded form body as nested params; raises :class:`BodyError` on a malformed body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("form body: not UTF-8") from None
    pairs = [p for p in text.split("&") if p]
    if len(pairs) > MAX_FIELDS:
        raise BodyError(f"form body: more than {MAX_FIELDS} fields")
    params: dict[str, Any] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        try:
            key = unquote_plus(name, errors="strict")
            val = unquote_plus(value, errors="strict") if eq else None
        except UnicodeDecodeError:
            raise BodyError(f"form body: field {name[:40]!r} is not UTF-8") from None
        _store(params, key, _segments(key), val)
    return params


def _segments(name: str) -> list[str]:
    """``a[b][]`` -> ``["a", "b", ""]``; raises on an empty or malformed name."""
    head, bracket, rest = name.partition("[")
    if not head:
        raise BodyError(f"form body: bad field name {name[:40]!r}")
    parts = [head]
    while bracket:
        inner, close, rest = rest.partition("]")
        if not close or (rest and not rest.startswith("[")):
            raise BodyError(f"form body: bad field name {name[:40]!r}")
        parts.append(inner)
        _, bracket, rest = rest.partition("[")
    if len(parts) > MAX_DEPTH:
        raise BodyError(f"form body: field {name[:40]!r} is nested deeper than {MAX_DEPTH}")
    return parts


def _conflict(name: str) -> BodyError:
    return BodyError(f"form body: field {name[:40]!r} mixes a value, a list and an object under one name")


def _store(node: dict[str, Any], name: str, parts: list[str], value: str | None) -> None:
    key, rest = parts[0], parts[1:]
    if not rest:
        if isinstance(node.get(key), list | dict):
            raise _conflict(name)
        node[key] = value
        return
    if rest[0] == "":
        _store_list(node, name, key, rest[1:], value)
        return
    child = node.setdefault(key, {})
    if not isinstance(child, dict):
        raise _conflict(name)
    _store(child, name, rest, value)


def _store_list(node: dict[str, Any], name: str, key: str, rest: list[str], value: str | None) -> None:
    items = node.setdefault(key, [])
    if not isinstance(items, list):
        raise _conflict(name)
    if not rest:
        if value is not None:  # `a[]` with no value is an empty list, as Rails has it
            items.append(value)
        return
    if rest[0] == "":
        raise BodyError(f"form body: field {name[:40]!r}: a list of lists is not supported")
    last = items[-1] if items else None
    if not isinstance(last, dict) or _has(last, rest):
        last = {}
        items.append(last)
    _store(last, name, rest, value)


def _has(node: dict[str, Any], parts: list[str]) -> bool:
    """Whether ``node`` already holds a value at ``parts`` (then a repeated name starts a new list element)."""
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return False
        node = child
    return parts[-1] in node and not isinstance(node[parts[-1]], list)
