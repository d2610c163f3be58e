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
    # Its exit code is not looked at: it exits 2 for a configuration
    # `serve` would refuse now (an admin token file removed since the
    # start) while still printing the address the running server has.
    # Both timeouts together stay within the image's 3 s.
    try:
        done = subprocess.run(
            [binary, "config", "--print"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=1,
        )
    except (OSError, subprocess.SubprocessError) as e:
        print(f"healthcheck: {binary} config --print: {e}", file=sys.stderr)
        return 1
    printed = done.stdout.decode("utf-8", "replace")
    found = re.search(r'^bind = "([^"]+)"', printed, re.MULTILINE)
    if found is None:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        print(
            "healthcheck: no bind address in `forgesyte config --print`"
            + (f": {said[-1]}" if said else ""),
            file=sys.stderr,
        )
        return 1
    host, _, port = found.group(1).rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    url = f"http://{host}:{port}/livez"
    try:
        # Straight to the server: an `http_proxy` of the environment is not
        # for a loopback address.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=1.5) as answer:
            answer.read()
    except OSError as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
