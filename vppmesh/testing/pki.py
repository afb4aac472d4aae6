"""A throwaway PKI for the HTTPS metrics endpoint: a CA, a server and a client certificate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any


def certificate(name: str, key: Any, issuer: tuple[Any, str] | None, *, ca: bool,
                serial: int = 1) -> Any:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer_name = issuer if issuer else (key, name)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer_name)]))
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def make_pki(tmp_path: Path, serial: int = 1) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def write(name: str, cert: Any, key: Any) -> tuple[Path, Path]:
        cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1())
                                      for _ in range(3))
    ca = certificate("test CA", ca_key, None, ca=True)
    server = certificate("node1", server_key, (ca_key, "test CA"), ca=False, serial=serial)
    client = certificate("prometheus", client_key, (ca_key, "test CA"), ca=False)
    ca_cert, _ = write("ca", ca, ca_key)
    server_cert, server_key_path = write("server", server, server_key)
    client_cert, client_key_path = write("client", client, client_key)
    return SimpleNamespace(ca=ca_cert, cert=server_cert, key=server_key_path,
                           client_cert=client_cert, client_key=client_key_path)
