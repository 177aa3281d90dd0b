"""Redis URLs as they may be shown: with every password replaced by ``***``."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["redact_url"]


def _redact_query(query: str) -> str:
    return "&".join(
        f"{k}=***" if k.lower().endswith("password") else (f"{k}={v}" if v or "=" in pair else k)
        for pair in query.split("&") if pair
        for k, _, v in [pair.partition("=")]
    )


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and errors): in its credentials and in a
    ``password=`` (or ``*_password=``) query argument."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user, colon, _ = creds.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"{user}@{host}"
    query = _redact_query(parts.query)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + (
        f"#{parts.fragment}" if parts.fragment else "")
