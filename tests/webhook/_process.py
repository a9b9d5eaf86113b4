"""The real webhook process (``python -m broker webhook``) and a client that speaks to it
as the API server does: HTTPS to /mutate trusting the webhook's CA, AdmissionReview v1."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import requests

from tests.webhook import _pods


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Answer:
    allowed: bool
    patch: list[dict[str, Any]]
    message: str
    raw: dict[str, Any]
    uid_matches: bool

    def apply(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod as stored after this answer (RFC 6902, applied by the jsonpatch library)."""
        patched: dict[str, Any] = jsonpatch.apply_patch(pod, self.patch)
        return patched


class WebhookProcess:
    def __init__(
        self,
        tmp: Path,
        kubeconfig: Path,
        cert: Path,
        key: Path,
        ca_file: Path,
        *flags: str,
        program: Sequence[str] = (sys.executable, "-m", "broker"),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``program``/``environ``: another installation of the webhook (tests/test_wheel.py)."""
        self.port, self.admin_port = free_port(), free_port()
        self.ca_file = ca_file
        self.stderr_path = tmp / f"webhook-{self.port}.log"
        base = os.environ if environ is None else environ
        env = {k: v for k, v in base.items() if not k.startswith("WIF_BROKER_")}
        env["KUBECONFIG"] = str(kubeconfig)
        argv = [
            *program,
            "webhook",
            f"--webhook-listen=127.0.0.1:{self.port}",
            f"--admin-listen=127.0.0.1:{self.admin_port}",
            f"--tls-cert-file={cert}",
            f"--tls-key-file={key}",
            "--log-format=json",
            "--shutdown-delay=0",  # tests that need the delay pass their own (the last flag wins)
            *flags,
        ]
        self._log = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=self._log)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy between the "API server" and the webhook

    @classmethod
    def annotated_default(
        cls, tmp: Path, kubeconfig: Path, tls: Path, *flags: str, **kwargs: Any
    ) -> WebhookProcess:
        """The usual webhook: the test CA's files in ``tls`` (tests.fakes.tls.make_test_ca),
        the test image and provider audience, then ``flags``."""
        return cls(
            tmp,
            kubeconfig,
            tls / "server.pem",
            tls / "server.key",
            tls / "ca.pem",
            f"--sidecar-image={_pods.IMAGE}",
            f"--audience={_pods.AUDIENCE}",
            *flags,
            **kwargs,
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mutate"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"webhook exited {self.proc.returncode}: {self.log()}")
            try:
                if self.session.get(self.admin_url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"webhook not ready in {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def post(self, body: Any, timeout: float = 15.0) -> requests.Response:
        return self.session.post(self.url, json=body, verify=str(self.ca_file), timeout=timeout)

    def review(self, pod: dict[str, Any], namespace: str = "team-a", operation: str = "CREATE") -> Answer:
        body = _pods.review(pod, namespace=namespace, operation=operation)
        reply = self.post(body)
        assert reply.status_code == 200, reply.text
        assert reply.headers["Content-Type"].startswith("application/json")
        data = reply.json()
        assert data["apiVersion"] == "admission.k8s.io/v1"
        assert data["kind"] == "AdmissionReview"
        response = data["response"]
        patch: list[dict[str, Any]] = []
        if "patch" in response:
            assert response["patchType"] == "JSONPatch"
            patch = json.loads(base64.b64decode(response["patch"]))
        return Answer(
            allowed=response["allowed"],
            patch=patch,
            message=response.get("status", {}).get("message", ""),
            raw=data,
            uid_matches=response["uid"] == body["request"]["uid"],
        )

    def metrics(self) -> dict[str, float]:
        text = self.session.get(self.admin_url + "/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            if line.startswith("wif_broker_webhook_") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.session.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._log.close()
        return rc
