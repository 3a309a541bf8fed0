"""Bearer API keys of the OpenAI endpoint: where they come from and the constant-time check."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

__all__ = ["ApiKeys", "ApiKeyError"]


class ApiKeyError(ValueError):
    """Auth is configured but no key could be read (the endpoint must not start open)."""


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeys:
    """The set of accepted bearer keys, held as SHA-256 digests.

    Invariants: at least one key; `accepts` compares the presented value with every key through
    `hmac.compare_digest` on equal-length digests, so its time does not depend on which key matched, on how
    much of a key matched or on the keys' lengths.
    """

    def __init__(self, keys: list[str]) -> None:
        cleaned = [k.strip() for k in keys if k.strip()]
        if not cleaned:
            raise ApiKeyError("API key auth is configured but no key was found")
        self._digests = [_digest(k.encode()) for k in cleaned]

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def load(cls, *, file: str | None, env: str | None) -> "ApiKeys | None":
        """Keys from `file` (one a line, `#` comments) and env var `env` (comma-separated); None when neither is set."""
        if file is None and env is None:
            return None
        keys: list[str] = []
        if file is not None:
            path = Path(file).expanduser()
            try:
                text = path.read_text()
            except OSError as exc:
                raise ApiKeyError(f"cannot read API key file {path}: {exc.strerror}") from None
            keys += [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        if env is not None:
            keys += os.environ.get(env, "").split(",")
        return cls(keys)

    def accepts(self, authorization: bytes | None) -> bool:
        """Whether an `Authorization` header value is `Bearer <one of the keys>`."""
        scheme, _, token = (authorization or b"").partition(b" ")
        presented = _digest(token.strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched and scheme.lower() == b"bearer"
