"""Guards for the Azure tests: nothing in this process may leave loopback.

The fakes (IMDS, Entra ID, Google), the broker and azure-identity all run in the
test process; the AWS tests' guard refuses and records any connection to a
non-loopback address (the real IMDS at 169.254.169.254, login.microsoftonline.com)
and fails the test at teardown.
"""

from __future__ import annotations

from tests.aws.conftest import loopback_only

__all__ = ["loopback_only"]
