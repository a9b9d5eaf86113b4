"""The throughput baseline: the smallest aiohttp server answering the token path.

Same aiohttp, same event loop policy, ``access_log=None`` and the same listen
backlog as the broker, returning a fixed JSON body of a given size as
``application/json``. Whatever the broker costs beyond this is the broker's.

    python -m bench.baseline_server --port 18990 --body-size 285
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiohttp import web

from bench.wire import LOOPBACK, TOKEN_PATH


def body_of_size(size: int) -> bytes:
    """A token-response-shaped JSON document of exactly ``size`` bytes."""
    doc = {"access_token": "", "expires_in": 3599, "token_type": "Bearer"}
    empty = len(json.dumps(doc, separators=(",", ":")))
    if size < empty + len("ya29."):
        raise ValueError(f"body size {size} is smaller than the minimal token document")
    doc["access_token"] = "ya29." + "b" * (size - empty - len("ya29."))
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == size
    return body


async def serve(port: int, size: int) -> None:
    body = body_of_size(size)

    async def token(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get(TOKEN_PATH, token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-size", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.body_size))


if __name__ == "__main__":
    main()
