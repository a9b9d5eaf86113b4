"""A strict fake Kubernetes API server for the webhook's one call: GET a ServiceAccount.

TLS with a per-run test CA, a bearer token required (401 Status otherwise), real
``ServiceAccount`` and ``Status`` JSON as kube-apiserver writes them, and per-object
failure modes (403, 500, a hang). It runs on its own thread and loop so that a
module-scoped webhook process can use it from synchronous tests. Every request is
recorded; anything but the one read the webhook may make is answered 404 and
listed in :attr:`unexpected`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.tls import make_test_ca

_SA_PATH = re.compile(r"^/api/v1/namespaces/([a-z0-9-]{1,63})/serviceaccounts/([a-z0-9.-]{1,253})$")


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def service_account(namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": "6c1c7a7e-0d4b-4f5e-9a55-" + secrets.token_hex(6),
        "resourceVersion": "4242",
        "creationTimestamp": "2026-12-01T10:00:00Z",
    }
    if annotations:
        meta["annotations"] = annotations
    return {"kind": "ServiceAccount", "apiVersion": "v1", "metadata": meta}


@dataclass
class FakeApiServer:
    directory: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    delay_seconds: float = 0.0
    accounts: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)  # "forbidden" | "error" | "hang"
    reads: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    port: int = 0

    def add(self, namespace: str, name: str, annotations: dict[str, str] | None = None) -> None:
        self.accounts[(namespace, name)] = dict(annotations or {})

    async def _handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        match = _SA_PATH.match(request.path)
        if request.method != "GET" or not match or request.query_string:
            self.unexpected.append(f"{request.method} {request.path_qs}")
            return web.json_response(
                status(404, "NotFound", "the server could not find the requested resource"), status=404
            )
        namespace, name = match.groups()
        self.reads.append((namespace, name))
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        failure = self.failures.get((namespace, name))
        if failure == "hang":
            await asyncio.sleep(3600)
        if failure == "forbidden":
            message = (
                f'serviceaccounts "{name}" is forbidden: User "system:serviceaccount:wif-broker:webhook" '
                f'cannot get resource "serviceaccounts" in API group "" in the namespace "{namespace}"'
            )
            body = status(403, "Forbidden", message, name=name, kind="serviceaccounts")
            return web.json_response(body, status=403)
        if failure == "error":
            body = status(500, "InternalError", "Internal error occurred: etcdserver: request timed out")
            return web.json_response(body, status=500)
        if (namespace, name) not in self.accounts:
            body = status(
                404, "NotFound", f'serviceaccounts "{name}" not found', name=name, kind="serviceaccounts"
            )
            return web.json_response(body, status=404)
        return web.json_response(service_account(namespace, name, self.accounts[(namespace, name)]))

    # ---- life cycle on a private thread

    def start(self) -> FakeApiServer:
        ca = make_test_ca(self.directory)
        self.ca_file = ca.ca_file
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def boot() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ca.server_context)
            await site.start()
            self.port = self._runner.addresses[0][1]

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(boot())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-apiserver", daemon=True)
        self._thread.start()
        assert started.wait(10), "fake API server did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        await self._runner.cleanup()
        # A "hang" handler outlives cleanup's grace period. Left pending, it is destroyed
        # whenever the garbage collector reaches this loop, in some later test: cancelled
        # here, as asyncio.run does with what is left at its end.
        current = asyncio.current_task()
        rest = [task for task in asyncio.all_tasks() if task is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig as ``kubectl config view --raw`` would show it (JSON is YAML)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.port}",
                        "certificate-authority": str(self.ca_file),
                    },
                }
            ],
            "users": [{"name": "webhook", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "webhook"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config), encoding="utf-8")
        return path


def main() -> None:
    """``python -m tests.webhook._fakeapi DIR DELAY_MS NS/NAME=EMAIL...``: serve until SIGTERM,
    after writing DIR/kubeconfig (bench/webhook.py runs it in its own process, so the load
    generator and the fake API server do not share an interpreter)."""
    import signal
    import sys

    directory, delay_ms, *accounts = sys.argv[1:]
    fake = FakeApiServer(Path(directory), delay_seconds=int(delay_ms) / 1000).start()
    for item in accounts:
        target, email = item.split("=", 1)
        namespace, name = target.split("/", 1)
        fake.add(namespace, name, {"iam.gke.io/gcp-service-account": email})
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    fake.write_kubeconfig(Path(directory) / "kubeconfig.tmp").rename(Path(directory) / "kubeconfig")
    done.wait()
    fake.stop()


if __name__ == "__main__":
    main()
