"""Strict fakes of Google STS and IAM Credentials, under one import.

Each service lives in its own module (``sts``, ``iam``) to keep them small;
this module is the stable import path for tests and the offline demo.
"""

from __future__ import annotations

from broker.fakes._service import Recorded
from broker.fakes.iam import FakeIam
from broker.fakes.sts import FakeSts, IssuedToken

__all__ = ["FakeIam", "FakeSts", "IssuedToken", "Recorded"]
