"""Container health checks: ``python -m radfed.deploy.health site|coordinator``.

Exit 0 when the local Flower process answers ``GET /health``: the site's SuperNode on
its loopback Runtime API, the coordinator's SuperLink over TLS (verified with the study
CA). Reads the same environment as the entrypoints.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Sequence

from radfed.deploy.settings import ConfigError, coordinator_settings, site_settings


def site_healthy(timeout: float = 5.0) -> bool:
    port = site_settings().runtime_port
    try:
        url = f"http://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def coordinator_healthy(timeout: float = 5.0) -> bool:
    from radfed.deploy.coordinator import health

    return health(coordinator_settings(), timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    role = args[0] if args else ""
    if role not in ("site", "coordinator"):
        print("usage: python -m radfed.deploy.health site|coordinator", file=sys.stderr)
        return 2
    try:
        ok = site_healthy() if role == "site" else coordinator_healthy()
    except ConfigError as exc:
        print(f"radfed-health: error: {exc}", file=sys.stderr)
        return 2
    print("healthy" if ok else "unhealthy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
