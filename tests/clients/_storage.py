"""A fake Cloud Storage for client tests: only tokens the fake IAM issued may list or read.

A listing that succeeds is the end-to-end proof: the client found the broker,
got a token from it, and put that token on a real API call.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.fakes import FakeGoogle
from tests.fakes.gcs import FakeGcs

BUCKET = "wif-broker-demo-bucket"
OBJECT = "reports/hello.txt"
CONTENT = b"hello from the fake bucket\n"


@contextlib.asynccontextmanager
async def fake_gcs(google: FakeGoogle, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[FakeGcs]:
    """A FakeGcs with one bucket and one object, accepting only tokens ``google.iam`` issued."""
    gcs = FakeGcs(lambda token: token in google.iam.issued_access, ssl_context=ssl_context)
    gcs.put(BUCKET, OBJECT, CONTENT)
    gcs.put(BUCKET, "top-level.txt", b"top\n")
    async with gcs:
        yield gcs


def loopback_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 and the self-signed certificate a client must trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wif-broker fake GCS")])
    now = datetime.datetime.now(datetime.UTC)
    loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(loopback, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "gcs-cert.pem"
    key_path = directory / "gcs-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path
