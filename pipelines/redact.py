"""Credentials out of URIs before they are logged or stored.

A URI may carry a secret: a password in its userinfo (``postgresql://user:pw@host/db``, ``https://user:pw@host``,
``https://TOKEN@host``) or a signature in its query (a presigned S3 URL's ``X-Amz-Signature``, ``X-Amz-Credential``,
``X-Amz-Security-Token``; ``Signature`` of S3's older form, Azure's ``sig``, a ``token=``). ``redact_uri`` replaces
those parts by ``***`` and keeps the rest (scheme, user name, host, path, the other parameters), so that what is
logged still says where a thing is. Everything that puts a URI into a log line, an MLflow param or tag, an error
message or a Ray job goes through it (or through ``redact_text`` for free text).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"

#: Query parameters whose values are secrets (compared lowercase), and name parts that mark one.
SECRET_PARAMS = frozenset({"x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature", "sig",
                           "token", "x-goog-signature", "x-goog-credential", "awsaccesskeyid", "access_token",
                           "api_key", "apikey", "key", "password", "secret", "client_secret", "auth"})
_SECRET_PARTS = ("signature", "token", "secret", "password", "credential")

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
#: ``?name=value`` / ``&name=value`` outside a whole URI (requests' errors show "url: /path?X-Amz-Signature=...").
_PARAM = re.compile(r"([?&;])([A-Za-z0-9_.\-]+)=([^&\s'\"<>#]*)")


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAMS or any(part in lowered for part in _SECRET_PARTS)


def redact_uri(uri: str) -> str:
    """``uri`` without its credentials: userinfo password and secret query values become ``***``; an http(s) user
    name alone (a token used as one) too. Anything that is not a URI is returned unchanged."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        hostinfo = parts.netloc.rpartition("@")
    except ValueError:  # not parseable: show nothing after the scheme rather than a secret
        return uri.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if hostinfo[1]:
        user, colon, _password = hostinfo[0].partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{hostinfo[2]}"
        elif parts.scheme.lower() in ("http", "https", "ws", "wss"):
            netloc = f"{MASK}@{hostinfo[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_param(k) for k, _ in pairs):
            query = "&".join(f"{quote(k, safe='-_.~')}={MASK if _secret_param(k) else quote(v, safe='-_.~/:')}"
                             for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URI in it passed through ``redact_uri`` (log lines, error messages, command lines)."""
    if not isinstance(text, str):
        return text
    if "://" in text:
        text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    return _PARAM.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if _secret_param(m[2]) and m[3] != MASK else m[0], text)


def redact_values(obj: Any) -> Any:
    """A JSON-like object with ``redact_text`` applied to every string in it (params, tags, logged dicts)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return obj


def has_secret(text: str) -> bool:
    """Whether ``text`` holds a URI that ``redact_uri`` would change."""
    return redact_text(text) != text


class RedactingFilter(logging.Filter):
    """A log handler filter passing every record's message and traceback through ``redact_text``: for the handlers
    of an entry point, where other libraries' records (urllib3's request lines at DEBUG, say) land too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """Add a ``RedactingFilter`` to each handler of ``logger`` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
