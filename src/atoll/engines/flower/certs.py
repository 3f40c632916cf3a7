"""Test certificates for a Flower deployment: a CA, a SuperLink TLS certificate signed by it, and
SuperNode authentication keys (EC P-384, OpenSSH format, as Flower's node authentication expects).

For real deployments use certificates from your own CA; these are for trying TLS and node
authentication end to end (they are written with owner-only permissions on private keys).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from atoll.engines.flower.processes import CertPaths


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def generate(directory: Path, hosts: list[str], nodes: int = 0, days: int = 365) -> CertPaths:
    """Write ca.crt/ca.key, server.pem/server.key (valid for ``hosts``) and node-<i>/node-<i>.pub
    for i < ``nodes`` into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atoll test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.ca, ca_cert.public_bytes(pem))
    _write(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password), private=True)

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts + ["localhost", "127.0.0.1", "::1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.server_cert, server_cert.public_bytes(pem))
    _write(paths.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password), private=True)

    for index in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(paths.node_key(index), key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_password), private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(paths.node_public_key(index), public + b"\n")
    return paths
