"""The webhook process: HTTPS ``POST /mutate`` plus the admin listener (SPEC §9).

One request: parse the AdmissionReview v1, decide what needs no API call
(:func:`inject.precheck`), read the pod's ServiceAccount live, decide, answer. Every
failure to read is a refusal naming the object and the fix (``failurePolicy: Fail``
in the chart makes a dead webhook refuse too): a pod is never admitted without the
injection it asked for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from broker import binding, metrics
from broker.metrics import Admission
from broker.webhook import inject
from broker.webhook.kube import ReadError, ServiceAccountReader
from broker.webhook.settings import WebhookSettings
from broker.webhook.tls import Reloader, server_context

log = logging.getLogger("broker.webhook")
SETTINGS = web.AppKey("webhook_settings", WebhookSettings)
READER = web.AppKey("sa_reader", ServiceAccountReader)
READY = web.AppKey("ready", asyncio.Event)
MAX_REVIEW_BYTES = 8 * 1024 * 1024  # a pod object is at most ~1.5 MiB in etcd; room for the envelope
DRAIN_SECONDS = 5.0


class BadReview(Exception):
    pass


def _review(body: Any) -> tuple[str, Mapping[str, Any]]:
    if not isinstance(body, dict) or body.get("apiVersion") != "admission.k8s.io/v1":
        raise BadReview("expected an AdmissionReview of admission.k8s.io/v1")
    if body.get("kind") != "AdmissionReview":
        raise BadReview("expected kind AdmissionReview")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("request.uid is missing")
    return request["uid"], request


def _answer(uid: str, decision: inject.Decision) -> web.Response:
    response: dict[str, Any] = {"uid": uid, "allowed": decision.allowed}
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(decision.patch)).encode()).decode()
    if not decision.allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": decision.message}
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
    return web.json_response(body)


async def _decide(app: web.Application, request: Mapping[str, Any]) -> inject.Decision:
    kind = request.get("kind") or {}
    pod = request.get("object")
    if (
        kind.get("kind") != "Pod"
        or request.get("operation") != "CREATE"
        or request.get("subResource")
        or not isinstance(pod, dict)
    ):
        return inject.Decision(Admission.NOT_A_POD)
    early = inject.precheck(pod)
    if early is not None:
        return early
    namespace = str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default")
    # The ServiceAccount admission plugin runs before webhooks and fills this in; "default" as it would.
    sa_name = str((pod.get("spec") or {}).get("serviceAccountName") or "default")
    try:
        sa = await app[READER].read(namespace, sa_name)
    except ReadError as exc:
        metrics.WEBHOOK_SA_READS.cell(exc.outcome.value).value += 1
        message = f"wif-broker: {inject.describe(pod, namespace)}: {exc.problem}; fix: {exc.fix}"
        return inject.Decision(Admission.REFUSED, message=message)
    metrics.WEBHOOK_SA_READS.cell(metrics.SaRead.OK.value).value += 1
    return inject.decide(pod, namespace, sa_name, sa.annotations, app[SETTINGS])


async def mutate(request: web.Request) -> web.Response:
    began = time.perf_counter()
    try:
        uid, review = _review(await request.json(loads=json.loads))
    except (BadReview, ValueError) as exc:
        metrics.WEBHOOK_ADMISSIONS.cell(Admission.BAD_REQUEST.value).value += 1
        return web.json_response({"error": str(exc) or "body is not JSON"}, status=400)
    try:
        decision = await _decide(request.app, review)
    except Exception:  # the request boundary: never a 500 that the API server reports blindly
        log.exception("admission failed", extra={"event": "admission_error"})
        decision = inject.Decision(
            Admission.REFUSED,
            message="wif-broker: internal error deciding the injection; see the webhook log",
        )
    metrics.WEBHOOK_ADMISSIONS.cell(decision.outcome.value).value += 1
    metrics.WEBHOOK_SECONDS.observe(time.perf_counter() - began)
    if decision.outcome in (Admission.INJECTED, Admission.REFUSED):
        log.info(
            decision.message or "injected",
            extra={"event": "admission", "outcome": decision.outcome.value, "uid": uid},
        )
    return _answer(uid, decision)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    # Ready only once /mutate listens with a loaded certificate and a configured client.
    ready = request.app[READY].is_set()
    return web.json_response({"status": "ready" if ready else "not_ready"}, status=200 if ready else 503)


def create_webhook_app(cfg: WebhookSettings, reader: ServiceAccountReader) -> web.Application:
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[SETTINGS] = cfg
    app[READER] = reader
    app.router.add_post("/mutate", mutate)
    return app


def create_admin_app(ready: asyncio.Event) -> web.Application:
    app = web.Application(client_max_size=4096)
    app[READY] = ready
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    handler = make_aiohttp_handler(registry=metrics.WEBHOOK_REGISTRY, disable_compression=True)
    app.router.add_get("/metrics", handler)
    return app


async def serve(
    cfg: WebhookSettings,
    environ: Mapping[str, str],
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str, str], Awaitable[None]] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then drain and return."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ssl_ctx = server_context(cfg.tls_cert_file, cfg.tls_key_file)
    ready = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        admin = web.AppRunner(create_admin_app(ready), access_log=None, shutdown_timeout=1.0)
        await admin.setup()
        stack.push_async_callback(admin.cleanup)
        await web.TCPSite(admin, cfg.admin_listen.host, cfg.admin_listen.port).start()
        reader = await ServiceAccountReader.open(environ)
        stack.push_async_callback(reader.close)
        await stack.enter_async_context(Reloader(ssl_ctx, cfg.tls_cert_file, cfg.tls_key_file).running())
        runner = web.AppRunner(
            create_webhook_app(cfg, reader), access_log=None, shutdown_timeout=DRAIN_SECONDS
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, cfg.webhook_listen.host, cfg.webhook_listen.port, ssl_context=ssl_ctx)
        await site.start()
        # Everything imported and built so far (the Kubernetes client's models are large)
        # lives for the whole process: keep it out of every later full collection, which
        # otherwise walks it and shows up as the latency tail (bench/webhook.py).
        gc.freeze()
        ready.set()
        webhook_at, admin_at = binding.display(runner.addresses[0]), binding.display(admin.addresses[0])
        log.info("listening", extra={"event": "start", "webhook": webhook_at, "admin": admin_at})
        if on_listening is not None:
            await on_listening(webhook_at, admin_at)
        await stop.wait()
        # failurePolicy: Fail turns a review sent to a replica that already closed its port
        # into a refused pod. Not ready first, still answering, until the Service's
        # endpoints have dropped this replica; then drain.
        ready.clear()
        log.info("draining", extra={"event": "stop", "delay_seconds": cfg.shutdown_delay})
        await asyncio.sleep(cfg.shutdown_delay)
    log.info("stopped", extra={"event": "stopped"})
