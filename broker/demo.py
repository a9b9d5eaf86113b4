"""``wif-broker demo``: the real daemon in front of built-in fake upstreams.

Everything runs on loopback: a fake OIDC issuer writes a subject token to a
temporary file (re-minted hourly, like a kubelet rotating a projected token),
fake STS and IAM Credentials answer the exchange, and the real broker serves the
result. Tokens are visibly fake (``ya29.fake-…``) and useless anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker import daemon, envbundle, settings
from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle

DEMO_DEFAULTS = {"listen": ["127.0.0.1:8988"], "admin_listen": "127.0.0.1:8989", "zone": "us-central1-a"}
ROTATE_SECONDS = 3600


async def run_demo(flags: Mapping[str, Any]) -> int:
    async with FakeGoogle() as google:
        with tempfile.TemporaryDirectory(prefix="wif-broker-demo-") as tmp:
            token_file = Path(tmp) / "token"
            token_file.write_text(google.subject_token(lifetime_seconds=2 * ROTATE_SECONDS))
            cred_file = Path(tmp) / "credentials.json"
            info = google.credential_info(str(token_file))
            cred_file.write_text(json.dumps(info, indent=2))
            merged = {**DEMO_DEFAULTS, **{k: v for k, v in flags.items() if v not in (None, [])}}
            merged["credentials"] = str(cred_file)
            resolved = settings.build(merged, environ={})
            rotate = asyncio.create_task(_rotate(google, token_file))

            async def announce(addresses: list[str], _admin: list[str]) -> None:
                _print_intro(resolved, addresses[0] if addresses else str(resolved.listen[0]), tmp)

            try:
                await daemon.serve(resolved, on_listening=announce)
            finally:
                rotate.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rotate
    return 0


async def _rotate(google: FakeGoogle, token_file: Path) -> None:
    while True:
        await asyncio.sleep(ROTATE_SECONDS)
        token = google.subject_token(lifetime_seconds=2 * ROTATE_SECONDS)
        await asyncio.to_thread(token_file.write_text, token)


def _print_intro(resolved: settings.Settings, address: str, tmp: str) -> None:
    env = envbundle.render(settings.parse_address("listen", address), "sh")
    cred_file = shlex.quote(str(Path(tmp) / "credentials.json"))
    # Commands are printed to be pasted into a new shell, where this venv is not active:
    # name this process's own interpreter and executable by absolute path.
    python = shlex.quote(sys.executable)
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "wif-broker" and argv0.is_file():
        broker_cmd = shlex.quote(str(argv0.absolute()))
    else:  # python -m broker (or embedded): the same interpreter runs the same package
        broker_cmd = f"{python} -m broker"
    print(
        f"""
wif-broker demo: the real broker, with fake Google STS / IAM Credentials and a fake
OIDC identity on loopback. Tokens are fake (ya29.fake-...) and work nowhere else.

  account  {DEFAULT_SERVICE_ACCOUNT}
  project  {resolved.project_id} ({resolved.numeric_project_id})
  metadata http://{address}/computeMetadata/v1/
  admin    http://{resolved.admin_listen}/readyz  /metrics

In another shell, point any Google client at it:

{env}export CLOUDSDK_CONFIG={tmp}/gcloud   # a fresh gcloud config (no stale 'not on GCE' cache)

Then try:

  gcloud auth print-access-token
  curl -s -H 'Metadata-Flavor: Google' \\
    http://{address}/computeMetadata/v1/instance/service-accounts/default/token
  {python} -c 'import google.auth, google.auth.transport.requests as r; \\
c, p = google.auth.default(); c.refresh(r.Request()); print(p, c.service_account_email, c.expiry)'

The broker's credential file (an external_account JSON, like the one you will deploy):

  {cred_file}

Run its token chain once, step by step, with `check` (no environment needed):

  {broker_cmd} check --credentials {cred_file}

Ctrl-C (or SIGTERM) stops it.
""",
        file=sys.stdout,
        flush=True,
    )
