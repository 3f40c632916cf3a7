"""``atoll flower ...``: helpers for real deployments (see docs/flower.md).

``superlink`` and ``supernode`` replace themselves (exec) with Flower's ``flower-superlink`` /
``flower-supernode``, adding the offline environment and the flags a deployment needs; the PID
you see is the Flower process. TLS is the default; ``--insecure`` is accepted only on loopback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from atoll.errors import AtollError, ConfigError

flower_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Start Flower SuperLinks and SuperNodes for atoll runs.")


def _fail(error: AtollError) -> None:
    typer.echo(f"atoll: {error}", err=True)
    raise typer.Exit(2)


def _exec(command: list[str]) -> None:
    from atoll.engines.flower.processes import flower_env

    typer.echo(" ".join(command), err=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os.execve(command[0], command, flower_env(Path(os.environ["FLWR_HOME"]) if "FLWR_HOME" in os.environ else None))


@flower_app.command()
def superlink(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces; needs TLS)"),
    port: int = typer.Option(8000, help="port of the Control, Fleet and Runtime APIs"),
    certs: Optional[Path] = typer.Option(None, help="directory from `atoll flower certs` (ca.crt, server.pem, server.key)"),
    insecure: bool = typer.Option(False, help="plain HTTP (only on loopback)"),
    node_auth: bool = typer.Option(False, "--node-auth", help="accept only SuperNodes registered with `atoll flower register`"),
    database: Optional[Path] = typer.Option(None, help="keep the SuperLink's state in this SQLite file (default: in memory)"),
) -> None:
    """Start a SuperLink (TLS unless --insecure on loopback)."""
    from atoll.engines.flower.processes import CertPaths, superlink_command

    try:
        if (certs is None) == (not insecure):
            raise ConfigError(
                "choose --certs DIR (TLS) or --insecure (loopback only)", "create test certificates with `atoll flower certs DIR`"
            )
        command = superlink_command(host, port, CertPaths(certs) if certs else None, node_auth=node_auth, database=database)
    except AtollError as error:
        _fail(error)
    _exec(command)


@flower_app.command()
def supernode(
    superlink: str = typer.Option(..., help="host:port of the SuperLink"),
    partition_id: int = typer.Option(..., help="the data partition (client id) this node serves"),
    num_partitions: int = typer.Option(..., help="number of partitions (federation.clients of the runs)"),
    port: Optional[int] = typer.Option(None, help="port of this node's local runtime API (default 9094 + partition-id)"),
    certs: Optional[Path] = typer.Option(None, help="directory from `atoll flower certs` (its ca.crt, and node-<id> with --node-auth)"),
    root_certificates: Optional[Path] = typer.Option(None, help="CA certificate of the SuperLink (instead of --certs)"),
    auth_key: Optional[Path] = typer.Option(None, help="this node's private key for node authentication (instead of --node-auth)"),
    node_auth: bool = typer.Option(False, "--node-auth", help="authenticate with --certs' node-<partition-id> key"),
    insecure: bool = typer.Option(False, help="plain HTTP (only to a SuperLink on loopback)"),
    data_file: Optional[Path] = typer.Option(
        None, help="this node's own data file (.json/.jsonl/.csv/.parquet), read only by it, for runs with flower.node_data"
    ),
) -> None:
    """Start a SuperNode serving one data partition (or, with --data-file, its own data)."""
    from atoll.engines.flower.processes import CertPaths, supernode_command

    try:
        paths = CertPaths(certs) if certs else None
        root = root_certificates or (paths.ca if paths else None)
        key = auth_key
        if node_auth:
            if paths is None:
                raise ConfigError("--node-auth needs --certs DIR (its node-<partition-id> key)")
            key = paths.node_key(partition_id)
        command = supernode_command(
            superlink,
            partition_id,
            num_partitions,
            port if port is not None else 9094 + partition_id,
            root_certificates=None if insecure else root,
            auth_key=key,
            insecure=insecure,
            data_file=data_file,
        )
    except AtollError as error:
        _fail(error)
    _exec(command)


@flower_app.command()
def certs(
    directory: Path = typer.Argument(..., help="where to write ca.crt, server.pem, server.key and node keys"),
    host: list[str] = typer.Option([], "--host", help="a name or IP the SuperLink is reached at (repeatable; loopback is always added)"),
    nodes: int = typer.Option(0, help="also write node-<i> / node-<i>.pub authentication keys for i < NODES"),
) -> None:
    """Generate test TLS certificates and SuperNode keys."""
    from atoll.engines.flower.certs import generate

    paths = generate(directory, list(host), nodes)
    typer.echo(
        f"CA {paths.ca}, SuperLink certificate {paths.server_cert} (key {paths.server_key})"
        + (f", {nodes} node key pairs" if nodes else "")
    )


@flower_app.command()
def register(
    public_keys: list[Path] = typer.Argument(..., help="node public keys (node-<i>.pub from `atoll flower certs`)"),
    superlink: str = typer.Option(..., help="host:port of the SuperLink"),
    certs: Optional[Path] = typer.Option(None, help="directory holding the CA certificate (ca.crt)"),
    root_certificates: Optional[Path] = typer.Option(None, help="CA certificate of the SuperLink (instead of --certs)"),
) -> None:
    """Register SuperNode public keys with a SuperLink started with --node-auth."""
    from atoll.engines.flower.checks import split_address
    from atoll.engines.flower.processes import CertPaths, flower_env, run_flwr, write_connection

    try:
        split_address(superlink)
        root = root_certificates or (CertPaths(certs).ca if certs else None)
        if root is None or not Path(root).is_file():
            raise ConfigError("registering nodes needs the SuperLink's CA certificate", "give --certs DIR or --root-certificates ca.crt")
    except AtollError as error:
        _fail(error)
    with tempfile.TemporaryDirectory(prefix="atoll-flwr-home-") as home:
        write_connection(Path(home), "atoll", superlink, insecure=False, root_certificates=root)
        env = flower_env(Path(home))
        for key in public_keys:
            result = run_flwr(["supernode", "register", str(key), "atoll", "--format", "json"], env)
            output = (result.stdout or result.stderr).strip()
            if result.returncode != 0 or '"success": true' not in output.replace("\n", " ").replace("  ", " "):
                _fail(ConfigError(f"registering '{key}' failed: {output.splitlines()[-1] if output else result.returncode}"))
            typer.echo(f"registered {key}")


@flower_app.command()
def app(
    config: Path = typer.Argument(..., help="YAML config of the run"),
    directory: Path = typer.Argument(..., help="where to write the Flower app (a pyproject.toml)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set federation.rounds=3"),
    run_dir: Optional[Path] = typer.Option(None, help="run directory the ServerApp writes (default: run.root/<name>-<time>)"),
) -> None:
    """Write a Flower app for CONFIG, to submit yourself with `flwr run DIRECTORY <connection>`."""
    from atoll.config import load_config
    from atoll.engines.flower.appdir import write_app
    from atoll.report.rundir import RunDir
    from atoll.resolve import resolve

    try:
        run = resolve(load_config(config, list(set_) + ["engine=flower"]))
    except AtollError as error:
        _fail(error)
    target = run_dir or RunDir.choose_path(run.config)
    write_app(directory, run, target)
    typer.echo(f"wrote {directory / 'pyproject.toml'}; run directory {Path(target).expanduser().absolute()}")
    typer.echo(f"submit with: flwr run {directory} <connection> --stream")
