"""Wire constants shared by the bench and its baseline server (no heavy imports here)."""

from __future__ import annotations

LOOPBACK = "127.0.0.1"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
FLAVOR = {"Metadata-Flavor": "Google"}
