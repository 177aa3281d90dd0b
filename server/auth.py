"""The optional bearer token of ``clawq serve``: one ASGI middleware in front of every route.

With a token configured, every request needs ``Authorization: Bearer <token>`` (compared in constant time)
except the paths left open (``/metrics``); the paths in ``query_token_paths`` (only ``GET /``, the page)
may carry it as ``?token=`` instead, because a browser cannot add a header to the URL it opens.
Under ``hook_prefix`` (``/api/v1/hooks/``, ClawTrol's hook routes) the same token may come as
``X-Hook-Token: <token>`` instead, the header ClawTrol's hook clients send; nowhere else.
A refused request gets 401, ``{"error": "<one line>"}`` and a ``WWW-Authenticate: Bearer`` header, and
never reaches the application (so it never touches Redis).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

__all__ = ["HOOK_HEADER", "REALM", "BearerAuth", "bearer_token", "token_matches"]

REALM = "clawq"
#: The header ClawTrol's hook clients carry the token in.
HOOK_HEADER = "X-Hook-Token"


def token_matches(given: str | None, expected: str) -> bool:
    """Whether ``given`` is the configured token, in time independent of where they differ."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (scheme case-insensitive), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class BearerAuth:
    """Refuse HTTP requests without the right bearer token (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        *,
        open_paths: Iterable[str] = ("/metrics",),
        query_token_paths: Iterable[str] = ("/",),
        hook_prefix: str | None = "/api/v1/hooks/",
    ) -> None:
        if not token:
            raise ValueError("BearerAuth needs a non-empty token")
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)
        self.query_token_paths = frozenset(query_token_paths)
        self.hook_prefix = hook_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope)
        if error is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await WebSocketClose(code=1008, reason=error)(scope, receive, send)
            return
        challenge = f'Bearer realm="{REALM}"'
        if error.startswith("invalid"):
            challenge += ', error="invalid_token"'
        response = JSONResponse({"error": error}, status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _is_hook(self, path: str) -> bool:
        return self.hook_prefix is not None and path.startswith(self.hook_prefix) and "/." not in path

    def _given(self, scope: Scope, headers: Headers) -> str | None:
        """The bearer token, or on the page the ``?token=`` argument; None when neither is there."""
        given = bearer_token(headers.get("authorization"))
        if given is None and scope["path"] in self.query_token_paths and scope.get("method") in ("GET", "HEAD"):
            given = QueryParams(scope.get("query_string", b"")).get("token") or None
        return given

    def _refusal(self, scope: Scope) -> str | None:
        """None when the request may pass, else why not (one line)."""
        headers = Headers(scope=scope)
        given = self._given(scope, headers)
        hook_route = self._is_hook(scope["path"])
        hook = headers.get(HOOK_HEADER) if hook_route else None
        if hook is not None and token_matches(hook, self.token):
            return None
        if given is None and hook is not None:
            return f"invalid {HOOK_HEADER}"
        if given is None:
            also = f" or '{HOOK_HEADER}: <token>'" if hook_route else ""
            return f"missing bearer token: send the header 'Authorization: Bearer <token>'{also}"
        if not token_matches(given, self.token):
            return "invalid bearer token"
        return None
