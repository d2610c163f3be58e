"""The container image's health check (Dockerfile HEALTHCHECK).

Asks /livez (liveness only: readiness is the orchestrator's /readyz) of
the address `forgesyte serve` listens on, as `forgesyte config --print`
reports it: the image's config file, or a FORGESYTE_BIND or config file
given to the container. An unspecified address (0.0.0.0, [::]) is asked
on loopback. A --bind flag given to `serve` on the container's command
line is not seen here: set FORGESYTE_BIND instead.

Usage: python3 healthcheck.py [FORGESYTE_BINARY]  (default: forgesyte on
PATH). Exit 0 healthy, 1 not, with one line on stderr saying why.
"""

import re
import subprocess
import sys
import urllib.request


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "forgesyte"
    try:
        printed = subprocess.run(
            [binary, "config", "--print"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=2,
            check=True,
        ).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as e:
        print(f"healthcheck: {binary} config --print: {e}", file=sys.stderr)
        return 1
    found = re.search(r'^bind = "([^"]+)"', printed, re.MULTILINE)
    if found is None:
        print("healthcheck: no bind address in `forgesyte config --print`", file=sys.stderr)
        return 1
    host, _, port = found.group(1).rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    url = f"http://{host}:{port}/livez"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            answer.read()
    except OSError as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
