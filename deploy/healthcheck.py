"""Container HEALTHCHECK: exit 0 when the service on this host answers /v2/health/ready with 200.

Reads the same NOTSURE_* settings as the service (port, API keys), so an image run with another
port or with protected health endpoints stays healthy. Standard library only besides them.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from service.config import Settings

# A wildcard bind address is reachable on loopback; a specific one only on itself.
WILDCARDS = {"0.0.0.0", "::", ""}


def _first_key(settings: Settings) -> str | None:
    """A key the service accepts: from NOTSURE_API_KEYS, else the keys file (one a line)."""
    if settings.api_keys:
        return settings.api_keys[0]
    if settings.api_keys_file is not None and settings.api_keys_file.is_file():
        for line in settings.api_keys_file.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
    return None


def main() -> int:
    settings = Settings()
    host = "127.0.0.1" if settings.host in WILDCARDS else settings.host
    if ":" in host:
        host = f"[{host}]"
    request = urllib.request.Request(f"http://{host}:{settings.port}/v2/health/ready")
    key = _first_key(settings)
    if settings.protect_health and key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"not ready: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
