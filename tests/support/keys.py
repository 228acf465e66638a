"""Private keys for the SMART Backend Services tests (the fixtures ``rsa_key`` and ``pem``
are in tests/conftest.py)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

CLIENT_ID = "clm-stratify"


def pem_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
           enc: serialization.KeySerializationEncryption = serialization.NoEncryption()) -> bytes:
    """The key as PKCS#8 PEM (encrypted with ``enc``)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
