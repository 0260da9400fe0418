"""Throw-away TLS certificates and SuperNode key pairs for a loopback deployment (``deploy_loopback --secure``).

What it is for: exercising Flower's TLS and CLI-managed SuperNode authentication exactly as Flower's
"Authenticate SuperNodes" guide and its ``examples/supernode-authentication/generate_creds.py`` set
them up, without committing a key: everything is generated at run time into a folder the caller
owns (a temporary work folder), with private keys readable by the owner only.

* A self-signed CA (RSA) and a server certificate signed by it, valid for ``localhost``,
  ``127.0.0.1`` and ``::1`` only (Subject Alternative Names), for the SuperLink's APIs.
* One EC key pair (NIST P-384, OpenSSH format: what ``flower-supernode --auth-supernode-private-key``
  loads) per name; the public half is what the operator registers with ``flwr supernode register``.

It must never be used for a real deployment: a hospital network has its own PKI, and a site's
private key is generated on, and never leaves, that site. RSA 2048 (not the example's 4096) keeps
generation under a second; the certificates live for one day.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = ["Credentials", "make_credentials"]


@dataclass(frozen=True)
class Credentials:
    """Paths of the generated files."""

    ca_cert: Path  # give to every SuperNode and CLI (--root-certificates / root-certificates)
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile (secret)
    node_keys: dict[str, Path]  # name -> private key (secret; --auth-supernode-private-key)
    node_public_keys: dict[str, Path]  # name -> public key (flwr supernode register)


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only from the start
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mmpfl loopback"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_credentials(folder: Path, node_names: Sequence[str]) -> Credentials:
    """Generate the CA, the SuperLink's certificate and one EC key pair per name under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (x509.CertificateBuilder().subject_name(_name("mmpfl loopback CA")).issuer_name(_name("mmpfl loopback CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(valid[0]).not_valid_after(valid[1])
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
    server_cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    paths = Credentials(ca_cert=folder / "ca.crt", server_cert=folder / "server.pem", server_key=folder / "server.key",
                        node_keys={n: folder / n for n in node_names},
                        node_public_keys={n: folder / f"{n}.pub" for n in node_names})
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(paths.server_key, server_key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))
    # The CA's private key is not written anywhere: nothing else will ever be signed with it.
    for name in node_names:
        key = ec.generate_private_key(ec.SECP384R1())
        _write_secret(paths.node_keys[name], key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.OpenSSH,
                                                               serialization.NoEncryption()))
        paths.node_public_keys[name].write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                               serialization.PublicFormat.OpenSSH))
    return paths
