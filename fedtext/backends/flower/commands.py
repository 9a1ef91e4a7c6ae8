"""The Flower commands of a fedtext deployment, built (not run) here; and its key material.

    superlink_command(...)   flower-superlink: Fleet, Control and Runtime APIs on one port
    supernode_command(...)   flower-supernode with this node's data in its node config
    connection_file(...)     the flwr CLI's SuperLink connection (FLWR_HOME/config.toml)
    run_config_file(...)     the run config of `flwr run` (what server_app.py reads)
    make_certs(dir, hosts)   a CA and a server certificate for the SuperLink (TLS)
    make_keys(dir, n)        SuperNode key pairs for --enable-supernode-auth

fedtext/cli/flower.py prints each command and runs it, so what a user sees is what a user
could type. Nothing here imports flwr; the certificates use `cryptography` (a dependency of
flwr).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import tomli_w

from fedtext.errors import FedtextError
from fedtext.paths import cache_dir

APP_DIR = Path(__file__).resolve().parent / "fedtext-app"  # what `flwr run` bundles
CONNECTION = "fedtext"  # the flwr CLI's name for the SuperLink connection we write
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # no phoning home
CA, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
LOG_FILE = "flower.log"  # the ServerApp's log in the run directory


def executable(name: str) -> str:
    """`name` from this Python's bin directory (the venv fedtext runs in), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name) or name


def flower_home(role: str, given: str | None = None) -> Path:
    """FLWR_HOME of one Flower process (it installs the app's FAB there): one per process."""
    return Path(given).expanduser().resolve() if given else cache_dir() / "flower" / role


def environment(home: Path) -> dict:
    """The environment of a Flower process: its FLWR_HOME, no telemetry, and this venv first
    on PATH (the SuperLink and SuperNodes start flower-superexec / flwr-*app by name)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **QUIET, "FLWR_HOME": str(home), "PATH": path}


def _tls(insecure: bool, ca: str | None, what: str) -> list[str]:
    if insecure:
        return ["--insecure"]
    if not ca:
        raise FedtextError(f"{what} uses TLS: give --ca CA.crt (from `fedtext flower certs`), "
                           "or --insecure to send everything unencrypted")
    return ["--root-certificates", _existing(ca)]


def _existing(path: str | Path) -> str:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FedtextError(f"{path}: no such file")
    return str(p)


def superlink_command(host: str = "127.0.0.1", port: int = 8000, certs: str | None = None,
                      insecure: bool = False, database: str | None = None,
                      supernode_auth: bool = False) -> list[str]:
    """flower-superlink serving every API on host:port; its ServerApps run in subprocesses
    of this venv, with no dependency installation (fedtext is installed here)."""
    cmd = [executable("flower-superlink")]
    if insecure:
        if supernode_auth:
            raise FedtextError("SuperNode authentication needs TLS: drop --insecure")
        cmd.append("--insecure")
    elif certs:
        d = Path(certs).expanduser()
        cmd += ["--ssl-ca-certfile", _existing(d / CA), "--ssl-certfile",
                _existing(d / SERVER_CERT), "--ssl-keyfile", _existing(d / SERVER_KEY)]
    else:
        raise FedtextError("the SuperLink uses TLS: give --certs DIR (made by `fedtext flower "
                           "certs DIR`), or --insecure to run it unencrypted")
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--host", host, "--port", str(port), "--database",
            str(Path(database).expanduser().resolve()) if database else ":flwr-in-memory:",
            "--disable-runtime-dependency-installation"]
    return cmd


def _toml_value(v) -> str:
    """One --node-config value: Flower reads `k=v` pairs as TOML, with no quote inside."""
    if not isinstance(v, str):
        return json.dumps(v)
    if '"' not in v and "\\" not in v:
        return json.dumps(v)  # a TOML basic string
    if "'" in v:
        raise FedtextError(f"{v!r}: a node config value cannot hold ' together with \" or \\")
    return f"'{v}'"  # a TOML literal string


def supernode_command(data: str, superlink: str = "127.0.0.1:8000", client_id: str | None = None,
                      port: int = 9094, ca: str | None = None, insecure: bool = False,
                      auth_key: str | None = None, data_cache: str | None = None,
                      threads: int | None = None) -> list[str]:
    """flower-supernode connecting to `superlink`, its node config naming this node's data
    (client_app.py reads it); `port` is its local API for its ClientApp processes (one per
    SuperNode on a machine)."""
    if data != "shakespeare":
        data = str(Path(data).expanduser().resolve())
    node = {"data-path": data, "client-id": client_id, "cache-dir": data_cache,
            "threads": threads}
    cmd = [executable("flower-supernode"), *_tls(insecure, ca, "the SuperNode")]
    if auth_key:
        cmd += ["--auth-supernode-private-key", _existing(auth_key)]
    cmd += ["--superlink", superlink, "--port", str(port), "--node-config",
            " ".join(f"{k}={_toml_value(v)}" for k, v in node.items() if v is not None)]
    return cmd


def connection_file(home: Path, superlink: str, ca: str | None, insecure: bool) -> Path:
    """The flwr CLI's connection file, home/config.toml: the SuperLink as connection
    "fedtext" (use it with FLWR_HOME=home: `flwr ls fedtext`, `flwr log RUN_ID fedtext`)."""
    conn = {"address": superlink}
    if insecure:
        conn["insecure"] = True
    else:
        _tls(insecure, ca, "the flwr CLI")
        conn["root-certificates"] = _existing(ca)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text("# Written by `fedtext flower`: the SuperLink connection of the flwr CLI.\n"
                    + tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    return path


def run_config_file(path: Path, sources: list, out: str, resume: bool, min_nodes: int = 0,
                    wait_nodes: float = 120.0, command: str = "") -> Path:
    """The run config of `flwr run --run-config PATH` (server_app.py reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({
        "sources": json.dumps(sources), "out": str(Path(out).expanduser().resolve()),
        "resume": resume, "min-nodes": min_nodes, "wait-nodes": float(wait_nodes),
        "command": command}))
    return path


def run_command(run_config: Path, stream: bool = True) -> list[str]:
    """`flwr run` of the fedtext app (with --stream: the ServerApp's log, until it ends)."""
    cmd = [executable("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config)]
    return cmd + (["--stream"] if stream else [])


def status_command(run_id: str) -> list[str]:
    return [executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]


def stop_command(run_id: str) -> list[str]:
    return [executable("flwr"), "stop", str(run_id), CONNECTION]


def register_command(public_key: str, name: str | None = None) -> list[str]:
    """`flwr supernode register`: let the SuperNode with this key join (--supernode-auth)."""
    cmd = [executable("flwr"), "supernode", "register", _existing(public_key), CONNECTION]
    return cmd + (["--name", name] if name else [])


# ----------------------------------------------------------------------------- key material


def _cryptography():
    try:
        import cryptography
    except ImportError:
        raise FedtextError("certificates and keys need the 'cryptography' package (installed "
                           "with Flower): pip install 'fedtext[flower]'") from None
    return cryptography


def make_certs(directory: str | Path, hosts: list[str] = (), days: int = 365) -> list[Path]:
    """A CA (ca.crt, ca.key) and the SuperLink's certificate (server.pem, server.key) signed
    by it, valid for localhost, 127.0.0.1, ::1 and `hosts` (names or IP addresses)."""
    import datetime
    import ipaddress

    _cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, sign_key, ca, sans=()):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                critical=False)
        return b.sign(sign_key, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    sans = []
    for h in ["localhost", "127.0.0.1", "::1", *hosts]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("fedtext flower CA"), name("fedtext flower CA"), ca_key, ca_key, True)
    server = cert(name("fedtext superlink"), ca.subject, key, ca_key, False, sans)
    pem = serialization.Encoding.PEM
    files = {CA: ca.public_bytes(pem), SERVER_CERT: server.public_bytes(pem)}
    for fname, k in ((CA_KEY, ca_key), (SERVER_KEY, key)):
        files[fname] = k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    out = []
    for fname, data in files.items():
        (d / fname).write_bytes(data)
        if fname.endswith(".key"):
            (d / fname).chmod(0o600)
        out.append(d / fname)
    return out


def make_keys(directory: str | Path, names: list[str]) -> list[Path]:
    """An EC (SECP384R1) key pair per name, OpenSSH format (`ssh-keygen -t ecdsa -b 384`):
    NAME (private, for flower-supernode) and NAME.pub (for `flwr supernode register`)."""
    _cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        k = ec.generate_private_key(ec.SECP384R1())
        (d / n).write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()))
        (d / n).chmod(0o600)
        (d / f"{n}.pub").write_bytes(k.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        out += [d / n, d / f"{n}.pub"]
    return out
