"""A fake of the Cloud Storage JSON API, just enough for real clients to list and read.

Serves bucket and object metadata, object listing and media download under
``/storage/v1/`` and ``/download/storage/v1/``: what ``gcloud storage ls``,
``gsutil ls`` and google-cloud-storage's ``list_blobs`` / ``download_as_bytes``
call. Every request must carry ``Authorization: Bearer <token>`` with a token
the injected ``validator`` accepts (the tests pass ``token in
google.iam.issued_access``), so a listing that succeeds proves the client sent
a token the broker obtained. Bearer tokens are recorded in arrival order.

Plain HTTP by default; pass an ``ssl.SSLContext`` for clients that only speak
HTTPS to a custom host (gsutil builds ``https://`` + ``gs_json_host``).
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from broker.fakes._service import FakeService, Handler, LoopbackServices, Service, google_error

CREATED = "2024-01-01T00:00:00.000Z"
_REALM = 'Bearer realm="https://accounts.google.com/"'


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum GCS reports next to MD5."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class FakeGcs(FakeService, LoopbackServices):
    """Buckets of objects behind a bearer-token check; ``calls`` and ``bearers`` record traffic."""

    def __init__(
        self, validator: Callable[[str], bool], *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(lifetime_seconds=0)
        self.validator = validator
        self.ssl_context = ssl_context
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.bearers: list[str] = []
        LoopbackServices.__init__(self)

    def put(self, bucket: str, name: str, data: bytes) -> None:
        """Create the bucket if needed and store one object in it."""
        self.buckets.setdefault(bucket, {})[name] = data

    # -- serving ----------------------------------------------------------------------------

    def _services(self) -> list[Service]:
        return [("gcs", self.app(), self.ssl_context)]

    @property
    def url(self) -> str:
        """``scheme://127.0.0.1:PORT``: google-cloud-storage's ``api_endpoint``."""
        return self._base("gcs")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    # -- the API ----------------------------------------------------------------------------

    def _add_routes(self, application: web.Application) -> None:
        application.middlewares.append(self._authenticate)
        router = application.router
        router.add_get("/storage/v1/b/{bucket}", self._get_bucket)
        router.add_get("/storage/v1/b/{bucket}/o", self._list_objects)
        router.add_get("/storage/v1/b/{bucket}/o/{name:.+}", self._get_object)
        router.add_get("/download/storage/v1/b/{bucket}/o/{name:.+}", self._download)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return self._unauthenticated("Anonymous caller does not have storage.objects.list access.")
        self.bearers.append(token)
        if not self.validator(token):
            return self._unauthenticated("Invalid Credentials")
        return await handler(request)

    @staticmethod
    def _unauthenticated(message: str) -> web.Response:
        return google_error(401, message, headers={"WWW-Authenticate": _REALM})

    def _bucket(self, request: web.Request) -> tuple[str, dict[str, bytes]]:
        name = request.match_info["bucket"]
        if name not in self.buckets:
            raise _NotFound(f"The specified bucket does not exist: {name}")
        return name, self.buckets[name]

    def _object(self, request: web.Request) -> tuple[str, str, bytes]:
        bucket, objects = self._bucket(request)
        name = request.match_info["name"]
        if name not in objects:
            raise _NotFound(f"No such object: {bucket}/{name}")
        return bucket, name, objects[name]

    def _object_resource(self, request: web.Request, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}"
        quoted = quote(name, safe="")
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/1",
            "selfLink": f"{base}/storage/v1/b/{bucket}/o/{quoted}",
            "mediaLink": f"{base}/download/storage/v1/b/{bucket}/o/{quoted}?generation=1&alt=media",
            "name": name,
            "bucket": bucket,
            "generation": "1",
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "size": str(len(data)),
            "md5Hash": _b64(hashlib.md5(data).digest()),
            "crc32c": _b64(crc32c(data).to_bytes(4, "big")),
            "etag": "CAE=",
            "timeCreated": CREATED,
            "updated": CREATED,
            "timeStorageClassUpdated": CREATED,
        }

    async def _get_bucket(self, request: web.Request) -> web.Response:
        try:
            name, _ = self._bucket(request)
        except _NotFound as exc:
            return google_error(404, str(exc))
        return web.json_response(
            {
                "kind": "storage#bucket",
                "id": name,
                "name": name,
                "selfLink": f"{request.scheme}://{request.host}/storage/v1/b/{name}",
                "projectNumber": "123456789012",
                "metageneration": "1",
                "location": "US",
                "locationType": "multi-region",
                "storageClass": "STANDARD",
                "etag": "CAE=",
                "timeCreated": CREATED,
                "updated": CREATED,
            }
        )

    async def _list_objects(self, request: web.Request) -> web.Response:
        try:
            bucket, objects = self._bucket(request)
        except _NotFound as exc:
            return google_error(404, str(exc))
        prefix = request.query.get("prefix", "")
        delimiter = request.query.get("delimiter", "")
        items: list[dict[str, Any]] = []
        prefixes: set[str] = set()
        for name in sorted(objects):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                continue
            items.append(self._object_resource(request, bucket, name, objects[name]))
        body: dict[str, Any] = {"kind": "storage#objects"}
        if items:
            body["items"] = items
        if prefixes:
            body["prefixes"] = sorted(prefixes)
        return web.json_response(body)

    async def _get_object(self, request: web.Request) -> web.Response:
        try:
            bucket, name, data = self._object(request)
        except _NotFound as exc:
            return google_error(404, str(exc))
        if request.query.get("alt") == "media":
            return self._media(data)
        return web.json_response(self._object_resource(request, bucket, name, data))

    async def _download(self, request: web.Request) -> web.Response:
        try:
            _, _, data = self._object(request)
        except _NotFound as exc:
            return google_error(404, str(exc))
        return self._media(data)

    @staticmethod
    def _media(data: bytes) -> web.Response:
        md5 = _b64(hashlib.md5(data).digest())
        crc = _b64(crc32c(data).to_bytes(4, "big"))
        headers = {
            "x-goog-hash": f"crc32c={crc},md5={md5}",
            "x-goog-generation": "1",
            "x-goog-metageneration": "1",
            "x-goog-stored-content-length": str(len(data)),
            "x-goog-storage-class": "STANDARD",
        }
        return web.Response(body=data, content_type="application/octet-stream", headers=headers)


class _NotFound(Exception):
    pass
