"""Optional API keys, compared in constant time, rotatable without a restart (a keys file)."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from service.errors import Unauthorized

log = logging.getLogger(__name__)


class KeyRing:
    """The accepted API keys: from settings plus a file that is re-read when it changes."""

    def __init__(self, keys: list[str], keys_file: Path | None) -> None:
        self._static = [k.encode() for k in keys]
        self._file = keys_file
        self._file_keys: list[bytes] = []
        self._mtime: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._file is not None

    def _refresh(self) -> None:
        if self._file is None:
            return
        try:
            mtime = self._file.stat().st_mtime_ns
        except FileNotFoundError:
            if self._file_keys:
                log.warning("API keys file disappeared; only keys from settings are accepted")
            self._file_keys, self._mtime = [], None
            return
        if mtime != self._mtime:
            lines = self._file.read_text(encoding="utf-8").splitlines()
            self._file_keys = [
                ln.strip().encode()
                for ln in lines
                if ln.strip() and not ln.lstrip().startswith("#")
            ]
            self._mtime = mtime
            log.info("loaded %d API keys from the keys file", len(self._file_keys))

    def accepts(self, presented: str | None) -> bool:
        """Whether this key is valid; every candidate is compared, in constant time."""
        if not self.enabled:
            return True
        if not presented:
            return False
        self._refresh()
        candidate = presented.encode()
        ok = False
        for key in (*self._static, *self._file_keys):
            ok |= hmac.compare_digest(candidate, key)
        return ok

    def check(self, authorization: str | None, x_api_key: str | None) -> None:
        """Raise Unauthorized unless the request's key headers carry an accepted key."""
        if not self.accepts(key_from_headers(authorization, x_api_key)):
            raise Unauthorized(
                "missing or unknown API key",
                field="Authorization",
                fix="send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            )


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """`Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None
