"""`fedtext flower ...`: deploy over Flower (SuperLink, SuperNodes, `flwr run`), TLS by default.

    fedtext flower certs certs/ --host server.example.org   # CA + SuperLink certificate
    fedtext flower superlink --certs certs/                  # terminal 1 (the server)
    fedtext flower supernode --data alice/ --ca certs/ca.crt --superlink server:8000
    fedtext flower run --config exp.toml --out /abs/runs/x --ca certs/ca.crt --superlink ...
    fedtext flower run --out /abs/runs/x --resume --rounds 20 ...   # after a ServerApp died

Each command prints the Flower command it runs (flower-superlink, flower-supernode, flwr), so
nothing is hidden. SuperNode authentication: `fedtext flower keys`, `superlink
--supernode-auth`, `register`, `supernode --auth-key`. docs/flower.md walks through it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fedtext.cli.flags import add_config_flags, config_sources
from fedtext.config import ExperimentConfig, merge
from fedtext.errors import FedtextError


def register(sub) -> None:
    p = sub.add_parser("flower", help="deploy over Flower: SuperLink, SuperNodes, flwr run",
                       description="Federated training over Flower's deployment engine: the "
                       "same training as `fedtext train`, each client a SuperNode with its own "
                       "data. Every command prints the Flower command it runs.")
    cmds = p.add_subparsers(dest="flower_command", metavar="STEP", required=True)

    c = cmds.add_parser("certs", help="a CA and a SuperLink TLS certificate (for --certs/--ca)")
    c.add_argument("dir", help="where to write ca.crt, ca.key, server.pem, server.key")
    c.add_argument("--host", action="append", default=[], help="a name or IP address the "
                   "SuperLink is reached at (repeatable; localhost, 127.0.0.1, ::1 always)")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.set_defaults(func=certs_cmd)

    c = cmds.add_parser("keys", help="SuperNode key pairs for --supernode-auth")
    c.add_argument("dir", help="where to write NAME (private) and NAME.pub for each name")
    c.add_argument("names", nargs="+", help="one key pair per name, e.g. alice bob")
    c.set_defaults(func=keys_cmd)

    c = cmds.add_parser("superlink", help="start the SuperLink (runs the ServerApps)")
    _security(c, server=True)
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 for other machines)")
    c.add_argument("--port", type=int, default=8000, help="its one HTTP(S) port: Fleet, "
                   "Control and Runtime APIs (default 8000)")
    c.add_argument("--database", help="SQLite file for its state (runs, logs, registered "
                   "SuperNodes) to survive a restart (default: in memory)")
    c.add_argument("--supernode-auth", action="store_true", help="only SuperNodes whose "
                   "public key was registered (`fedtext flower register`) may join")
    _common(c, "superlink")
    c.set_defaults(func=superlink_cmd)

    c = cmds.add_parser("supernode", help="start a SuperNode serving one client's data")
    c.add_argument("--data", required=True, metavar="shakespeare|PATH", help="this node's "
                   "data: a directory of <client>.txt files, a .jsonl file, or shakespeare")
    c.add_argument("--client-id", help="which client of --data this node is (needed when it "
                   "holds several, e.g. shakespeare)")
    c.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT "
                   "(default 127.0.0.1:8000)")
    _security(c, server=False)
    c.add_argument("--port", type=int, default=9094, help="the node's local port for its "
                   "ClientApps (default 9094; one per SuperNode on a machine)")
    c.add_argument("--auth-key", metavar="KEY", help="private key (`fedtext flower keys`) of "
                   "a node registered with a --supernode-auth SuperLink")
    c.add_argument("--threads", type=int, help="torch threads for this node's work")
    c.add_argument("--cache-dir", help="fedtext data cache on this node")
    _common(c, None)
    c.set_defaults(func=supernode_cmd)

    c = cmds.add_parser("register", help="register SuperNodes' public keys (--supernode-auth)")
    c.add_argument("public_keys", nargs="+", metavar="NAME.pub", help="public keys from "
                   "`fedtext flower keys`; each node is listed under its NAME in `flwr "
                   "supernode list`")
    c.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT")
    _security(c, server=False)
    _common(c, "cli")
    c.set_defaults(func=register_cmd)

    c = cmds.add_parser("run", help="train: submit the fedtext app with `flwr run`",
                        description="Submit the fedtext Flower app: the ServerApp runs "
                        "`fedtext train` with the SuperNodes as its clients, into --out on the "
                        "SuperLink's machine. Config flags as for `fedtext train`.")
    c.add_argument("--out", required=True, help="run directory on the SuperLink's machine "
                   "(made absolute here): metrics.jsonl, state.pt, final/, flower.log")
    c.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "last checkpoint (after the ServerApp was stopped or died)")
    c.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT")
    _security(c, server=False)
    c.add_argument("--min-nodes", type=int, default=0, help="SuperNodes to wait for before "
                   "starting (default: the clients per round)")
    c.add_argument("--wait-nodes", type=float, default=120.0, help="seconds to wait for them")
    c.add_argument("--detach", action="store_true", help="return once the run started (its "
                   "log: `flwr log RUN_ID fedtext`, as printed)")
    add_config_flags(c, ExperimentConfig())
    _common(c, "cli")
    c.set_defaults(func=run_cmd)


def _security(p, server: bool) -> None:
    g = p.add_mutually_exclusive_group()
    if server:
        g.add_argument("--certs", metavar="DIR", help="TLS: ca.crt, server.pem, server.key "
                       "from `fedtext flower certs DIR`")
    else:
        g.add_argument("--ca", metavar="CA.crt", help="TLS: the CA certificate that signed "
                       "the SuperLink's (ca.crt of `fedtext flower certs`)")
    g.add_argument("--insecure", action="store_true", help="no TLS: everything, the model "
                   "included, travels unencrypted")


def _common(p, role: str | None) -> None:
    p.add_argument("--flwr-home", help="FLWR_HOME of the Flower process (default "
                   f"$FEDTEXT_CACHE/flower/{role or 'supernode-PORT'})")
    p.add_argument("--dry-run", action="store_true", help="print the command (and write the "
                   "files it reads), do not run it")


def _show(cmd: list[str], home: Path) -> None:
    print(f"$ FLWR_HOME={shlex.quote(str(home))} {shlex.join(cmd)}", flush=True)


def _exec(cmd: list[str], home: Path, dry_run: bool) -> int:
    """Print the command, then become it (signals go straight to the Flower process)."""
    from fedtext.backends.flower import commands as K

    _show(cmd, home)
    if dry_run:
        return 0
    home.mkdir(parents=True, exist_ok=True)
    os.execvpe(cmd[0], cmd, K.environment(home))
    return 0  # pragma: no cover - exec does not return


def certs_cmd(args) -> int:
    from fedtext.backends.flower.commands import make_certs

    for f in make_certs(args.dir, args.host, args.days):
        print(f)
    print(f"SuperLink: --certs {args.dir}; SuperNodes and `fedtext flower run`: --ca "
          f"{Path(args.dir) / 'ca.crt'} (copy ca.crt to their machines; keep ca.key private)")
    return 0


def keys_cmd(args) -> int:
    from fedtext.backends.flower.commands import make_keys

    for f in make_keys(args.dir, args.names):
        print(f)
    return 0


def superlink_cmd(args) -> int:
    from fedtext.backends.flower import commands as K
    from fedtext.backends.flower import require_flwr

    require_flwr()

    cmd = K.superlink_command(args.host, args.port, args.certs, args.insecure, args.database,
                              args.supernode_auth)
    return _exec(cmd, K.flower_home(f"superlink-{args.port}", args.flwr_home), args.dry_run)


def supernode_cmd(args) -> int:
    from fedtext.backends.flower import commands as K
    from fedtext.backends.flower import require_flwr

    require_flwr()

    cmd = K.supernode_command(args.data, args.superlink, args.client_id, args.port, args.ca,
                              args.insecure, args.auth_key, args.cache_dir, args.threads)
    if not args.dry_run:
        _check_data(args)
    return _exec(cmd, K.flower_home(f"supernode-{args.port}", args.flwr_home), args.dry_run)


def _check_data(args) -> None:
    """Say what this node will serve, or why it cannot (it still starts: it then answers
    every request with that error, which the server logs)."""
    from fedtext.backends.flower.client_app import own_data
    from fedtext.data.tasks import open_dataset

    node = {"data-path": args.data, "client-id": args.client_id, "cache-dir": args.cache_dir}
    try:
        source, cid, cache = own_data({k: v for k, v in node.items() if v})
        n = open_dataset(source, cache).train.num_chars(cid)
        print(f"fedtext: this node is client {cid} ({n:,} train chars)", flush=True)
    except FedtextError as e:
        print(f"fedtext: warning: {e} (the node starts, and answers every request with this)",
              file=sys.stderr, flush=True)


def register_cmd(args) -> int:
    from fedtext.backends.flower import commands as K
    from fedtext.backends.flower import require_flwr

    require_flwr()

    home = K.flower_home("cli", args.flwr_home)
    K.connection_file(home, args.superlink, args.ca, args.insecure)
    for key in args.public_keys:
        cmd = K.register_command(key, Path(key).stem)
        _show(cmd, home)
        if not args.dry_run and subprocess.run(cmd, env=K.environment(home)).returncode:
            raise FedtextError(f"could not register {key} (see above)")
    return 0


def _run_status(run_id: str, env) -> dict:
    from fedtext.backends.flower import commands as K

    out = subprocess.run(K.status_command(run_id), env=env, capture_output=True, text=True)
    try:
        return json.loads(out.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        raise FedtextError(f"run {run_id}: cannot read its status ({out.stdout[-300:]} "
                           f"{out.stderr[-300:]})") from None


def _stop_dead_run(out: Path, env) -> None:
    """Before --resume, where the run directory is on this machine: if the last ServerApp of
    `out` is gone (nothing holds out/.lock) but Flower still counts its run as running (it
    notices a dead ServerApp after about a minute, and the SuperNodes wait for it meanwhile),
    stop that run, so the nodes take the new one's messages at once."""
    import re

    from fedtext.backends.flower import commands as K
    from fedtext.run.state import RunLock

    log = out / K.LOG_FILE
    ids = re.findall(r"fedtext ServerApp: run (\d+)", log.read_text(errors="replace")) \
        if log.is_file() else []
    if not ids:
        return
    try:
        with RunLock(out):  # taken and given back at once: its ServerApp is not running
            pass
    except FedtextError:
        return  # alive: train() refuses a second ServerApp with a clear message
    if _run_status(ids[-1], env)["status"] in ("pending", "starting", "running"):
        print(f"fedtext: the ServerApp of run {ids[-1]} is gone (nothing holds {out}/.lock); "
              "stopping that run so the SuperNodes drop its last messages", flush=True)
        subprocess.run(K.stop_command(ids[-1]), env=env, capture_output=True)


def run_cmd(args) -> int:
    from fedtext.backends.flower import commands as K
    from fedtext.backends.flower import require_flwr

    require_flwr()

    sources = config_sources(args)
    merge(ExperimentConfig(), *sources)  # a bad flag or file: an error here, not on the server
    home = K.flower_home("cli", args.flwr_home)
    K.connection_file(home, args.superlink, args.ca, args.insecure)
    command = shlex.join(["fedtext", *getattr(args, "argv", sys.argv[1:])])
    rc = K.run_config_file(home / "run-config.toml", [list(s) for s in sources], args.out,
                           args.resume, args.min_nodes, args.wait_nodes, command)
    cmd = K.run_command(rc, stream=not args.detach)
    env = K.environment(home)
    if args.resume and not args.dry_run:
        _stop_dead_run(Path(args.out).expanduser(), env)
    _show(cmd, home)
    if args.dry_run:
        print(rc.read_text(), end="")
        return 0
    run_id = None
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as p:
        for line in p.stdout:  # the ServerApp's log, passed through
            print(line, end="", flush=True)
            if run_id is None and line.startswith("Successfully started run "):
                run_id = line.split()[3]
    if p.returncode or run_id is None:
        return p.returncode or 1
    if args.detach:
        print(f"log: FLWR_HOME={shlex.quote(str(home))} flwr log {run_id} {K.CONNECTION}")
        return 0
    run = _run_status(run_id, env)
    traffic = run.get("network-traffic", {})
    print(f"run {run_id}: {run['status']} in {run.get('elapsed', 0):.0f} s, "
          f"{traffic.get('total-bytes', 0):,} bytes through the SuperLink")
    if run["status"] != "finished:completed":
        raise FedtextError(f"run {run_id} {run['status']}: {run.get('status-details')}")
    return 0
