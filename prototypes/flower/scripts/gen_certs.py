"""Generate throw-away TLS PKI + SuperNode auth keys for the Flower prototype.

Creates (in --out, default ../pki):
  ca.crt / ca.key            self-signed CA (root certificate for SuperNodes/CLI)
  server.pem / server.key    SuperLink server cert, SAN = localhost, 127.0.0.1, ::1
  node<i>_key / node<i>_key.pub   SuperNode auth key pairs: EC P-384 in OpenSSH format
                             (what `flower-supernode --auth-supernode-private-key` and
                             `flwr supernode register <pub>` expect)
  rogue_key / rogue_key.pub  an extra key pair that is never registered
"""
import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(p: Path, data: bytes, mode: int = 0o600) -> None:
    p.write_bytes(data)
    p.chmod(mode)


def gen_tls(out: Path, hosts: list[str]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crosslm-proto-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem_key = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    _write(out / "ca.key", pem_key(ca_key))
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(out / "server.key", pem_key(srv_key))
    _write(out / "server.pem", srv_cert.public_bytes(serialization.Encoding.PEM), 0o644)


def gen_node_key(out: Path, name: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    _write(out / f"{name}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode(), 0o644)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "pki"))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1", "::1"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gen_tls(out, a.hosts)
    for i in range(a.nodes):
        gen_node_key(out, f"node{i}_key")
    gen_node_key(out, "rogue_key")
    print(f"PKI written to {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
