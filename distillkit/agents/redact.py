"""Redact secrets (API keys, tokens) from text before it is stored in a record or logged.

:func:`redact` replaces, with ``[REDACTED]``:

- every configured secret (passed in, e.g. the API key a client was given, plus the values of
  environment variables that hold keys: ``*_API_KEY``, ``*_TOKEN``, ``*_SECRET``, ...);
- anything shaped like a key: ``sk-ant-...`` / ``sk-...`` keys, ``Bearer <token>``, the value of
  ``x-api-key: ...``, ``api_key=...``, ``"auth_token": "..."`` and similar assignments, and long
  high-entropy tokens (32+ hex digits, or 32+ base64 characters mixing upper case, lower case and digits).

Ordinary words, paths, request ids and other short identifiers are left alone.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Iterable, Mapping, Optional

__all__ = ["REDACTED", "redact", "secrets_from_environment"]

REDACTED = "[REDACTED]"

# Environment variables whose values are secrets: ANTHROPIC_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...
_SECRET_ENV_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|SECRET_ACCESS_KEY|PASSWORD|PASSWD)$", re.IGNORECASE)
# Shorter values (e.g. "1", "true") would redact ordinary text everywhere.
_MIN_ENV_SECRET_LENGTH = 8

_TOKEN_CHARS = r"A-Za-z0-9_\-"
_PROVIDER_KEY = re.compile(rf"(?<![{_TOKEN_CHARS}])sk-(?:ant-[{_TOKEN_CHARS}]{{6,}}|[{_TOKEN_CHARS}]{{20,}})")
_BEARER = re.compile(r"\b(Bearer\s+)([A-Za-z0-9._~+/=\-]+)", re.IGNORECASE)
# A credential-named key, optionally quoted, then ':' or '=', then the value (optionally quoted).
_ASSIGNMENT = re.compile(
    r"""(?P<name>["']?\b(?:x-api-key|api[_-]?key|apikey|access[_-]?token|auth[_-]?token|refresh[_-]?token|"""
    r"""session[_-]?token|client[_-]?secret|secret[_-]?key|password|passwd|authorization)\b["']?\s*[:=]\s*"""
    r"""(?:(?:Bearer|Basic|Token)\s+)?["']?)(?P<value>[^\s"',;&)\]}]+)""",
    re.IGNORECASE)
# Placeholder values an error message may show for an unset credential: worth keeping for diagnosis.
_NOT_A_SECRET = {"none", "null", "nil", "undefined", "unset", "missing", "empty", "<none>"}
_ALREADY_REDACTED = REDACTED[:-1]  # a value pattern may stop before the closing bracket
_HEX_TOKEN = re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])")
_BASE64_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{32,}={0,2}(?![A-Za-z0-9+/_\-])")
# Random base64 switches between upper case, lower case and digits every 1 to 3 characters; identifiers
# and paths (CamelCaseNames, /home/User/Projects) keep runs of 4+ ("Anthropic", "Projects").
_CASE_RUN = re.compile(r"[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
_MAX_MEAN_CASE_RUN = 3.2
_MIN_TOKEN_ENTROPY = 3.5  # bits per character: random base64 has 4 to 5; rules out "aB1aB1aB1..."


def secrets_from_environment(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The values of the environment variables named like keys (``*_API_KEY``, ``*_TOKEN``, ...)."""
    environ = os.environ if environ is None else environ
    return [value for name, value in environ.items()
            if _SECRET_ENV_NAME.search(name) and len(value.strip()) >= _MIN_ENV_SECRET_LENGTH]


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(token: str) -> bool:
    """A base64-alphabet run that mixes cases and digits at random: a key, not a word, a name or a path."""
    body = token.rstrip("=")
    if not (any(c.isupper() for c in body) and any(c.islower() for c in body)):
        return False
    runs = _CASE_RUN.findall(body)
    # Without digits, ask for more mixing: a few random tokens lack digits, but so do CamelCase words.
    max_run = _MAX_MEAN_CASE_RUN if any(c.isdigit() for c in body) else _MAX_MEAN_CASE_RUN - 0.7
    return sum(map(len, runs)) / len(runs) <= max_run and _entropy(body) >= _MIN_TOKEN_ENTROPY


def _redact_bearer(match: re.Match) -> str:
    token = match.group(2)
    # "Bearer token" or "Bearer authentication" in prose is not a credential; a real one has digits or length.
    if token.startswith(_ALREADY_REDACTED) or (len(token) < 20 and not any(c.isdigit() for c in token)):
        return match.group(0)
    return match.group(1) + REDACTED


def _redact_assignment(match: re.Match) -> str:
    value = match.group("value")
    if value.lower() in _NOT_A_SECRET or value.startswith(_ALREADY_REDACTED):
        return match.group(0)
    return match.group("name") + REDACTED


def redact(text: str, secrets: Iterable[Optional[str]] = ()) -> str:
    """``text`` with every secret in ``secrets`` and every key-shaped token replaced by ``[REDACTED]``."""
    if not text:
        return text
    # Longest first, so that a secret containing another is replaced whole.
    for secret in sorted({s for s in secrets if isinstance(s, str) and s.strip()}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _PROVIDER_KEY.sub(REDACTED, text)
    text = _BEARER.sub(_redact_bearer, text)
    text = _ASSIGNMENT.sub(_redact_assignment, text)
    text = _HEX_TOKEN.sub(REDACTED, text)
    return _BASE64_TOKEN.sub(lambda m: REDACTED if _looks_random(m.group(0)) else m.group(0), text)
