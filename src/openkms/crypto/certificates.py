"""X.509 certificates, as far as openkms compares them (the trust anchors of HSM clusters)."""

from __future__ import annotations

from cryptography import x509


def is_certificate(pem: str) -> bool:
    try:
        x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return False
    return True


def same_certificate(a: str, b: str) -> bool:
    """Whether two PEM texts hold the same certificate (whitespace and line ends aside)."""
    try:
        return x509.load_pem_x509_certificate(a.encode()) == x509.load_pem_x509_certificate(b.encode())
    except ValueError:
        return False
