"""The legitimate client of ``bench abuse``, in its own process.

``python -m bench.abuse_probe HOST PORT PATH LIMIT``: asks for ``PATH`` (with
``Metadata-Flavor: Google``) on one keep-alive connection every 10 ms, at most
``LIMIT`` times, until its stdin reaches end of file; then prints one JSON object:
``{"ms": [latencies of the 200s], "failures": n}``.

A process of its own because a legitimate client is one: measured from inside the
abuser's event loop, the probe's latency would include the time that loop spends
on the abuser's own requests, which is not the broker's doing. Blocking
``http.client`` (as ``requests``-based clients such as google-auth use) keeps the
client's own cost small and steady. The 10 ms pause is a ``select`` on stdin, so
closing it ends the loop at once. Loopback only; bounded by ``LIMIT``.
"""

from __future__ import annotations

import http.client
import json
import select
import sys
import time

TIMEOUT = 10.0
INTERVAL = 0.01


def run(host: str, port: int, path: str, limit: int) -> dict[str, object]:
    latencies: list[float] = []
    failures = 0
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    for _ in range(limit):
        began = time.perf_counter()
        try:
            conn.request("GET", path, headers={"Metadata-Flavor": "Google"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                latencies.append((time.perf_counter() - began) * 1000)
            else:
                failures += 1
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()  # reconnects on the next request
        if select.select([sys.stdin], [], [], INTERVAL)[0]:
            break  # stdin readable: closed (or written to) by the bench, stop
    conn.close()
    return {"ms": latencies, "failures": failures}


def main(argv: list[str]) -> int:
    host, port, path, limit = argv
    print(json.dumps(run(host, int(port), path, int(limit))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
