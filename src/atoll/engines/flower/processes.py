"""Starting and stopping Flower's processes (SuperLink, SuperNodes, the ``flwr`` CLI) offline.

Every process gets the environment of :func:`flower_env`: no telemetry, no update check, no
per-run dependency installation, no Ray usage statistics, Ray on 127.0.0.1, and (when given) a
private ``FLWR_HOME``. A SuperLink starts its launcher in a separate session, so stopping one
means stopping the whole tree: :class:`ManagedProcess` remembers the descendants, sends SIGTERM
and SIGKILLs whatever is left, each by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from atoll.engines.flower.checks import check_insecure, split_address
from atoll.errors import AtollError, ConfigError

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


class FlowerError(AtollError):
    kind = "flower error"


def flower_env(flwr_home: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: offline settings, this interpreter's scripts first
    on PATH (Flower launches ``flower-superexec`` and friends by name)."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def executable(name: str) -> str:
    """A Flower script from this interpreter's environment (or PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FlowerError(f"'{name}' is not installed", "pip install 'flwr[simulation]>=1.41,<1.42' (make setup installs it)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- TLS material -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    """The files ``atoll flower certs`` writes into a directory."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def node_key(self, partition_id: int) -> Path:
        return self.directory / f"node-{partition_id}"

    def node_public_key(self, partition_id: int) -> Path:
        return self.directory / f"node-{partition_id}.pub"

    def require(self, *paths: Path) -> None:
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"'{path}' does not exist", "create the certificates with `atoll flower certs DIR`")


# -- commands -----------------------------------------------------------------------------------------------


def superlink_command(
    host: str, port: int, certs: CertPaths | None = None, node_auth: bool = False, simulation: bool = False, database: Path | None = None
) -> list[str]:
    """``flower-superlink`` serving its Control, Fleet and Runtime APIs on host:port; TLS from
    ``certs`` or (loopback only) insecure."""
    command = [executable("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        check_insecure(host, "a SuperLink")
        if node_auth:
            raise ConfigError("SuperNode authentication needs TLS", "give --certs DIR (see `atoll flower certs`)")
        command.append("--insecure")
    else:
        certs.require(certs.ca, certs.server_cert, certs.server_key)
        command += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key)]
    if node_auth:
        command.append("--enable-supernode-auth")
    if simulation:
        command.append("--simulation")
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(
    superlink: str,
    partition_id: int,
    num_partitions: int,
    port: int,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
    data_file: Path | None = None,
) -> list[str]:
    """``flower-supernode`` serving data partition ``partition_id`` of ``num_partitions`` (and, for
    runs with ``flower.node_data``, its own ``data_file``); its local runtime API listens on
    127.0.0.1:``port`` (one port per SuperNode on a host)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    host, _ = split_address(superlink)
    command = [executable("flower-supernode"), "--superlink", superlink, "--port", str(port), "--host", "127.0.0.1"]
    if insecure:
        check_insecure(host, "a SuperNode's SuperLink")
        if auth_key is not None:
            raise ConfigError("SuperNode authentication needs TLS", "drop --insecure and give the CA certificate")
        command.append("--insecure")
    else:
        if root_certificates is None:
            raise ConfigError(
                "a TLS connection needs the CA certificate that signed the SuperLink's", "give --certs DIR or --root-certificates ca.crt"
            )
        if not Path(root_certificates).is_file():
            raise ConfigError(f"'{root_certificates}' does not exist", "create the certificates with `atoll flower certs DIR`")
        command += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        if not Path(auth_key).is_file():
            raise ConfigError(f"'{auth_key}' does not exist", "create node keys with `atoll flower certs DIR --nodes N`")
        command += ["--auth-supernode-private-key", str(auth_key)]
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_file is not None:
        node_config += f" data-file={_toml_path(data_file)}"
    command += ["--node-config", node_config]
    return command


def _toml_path(path: Path) -> str:
    """An existing data file's absolute path as a quoted value Flower's --node-config parser accepts
    (it splits on spaces outside quotes and reads each value as TOML)."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist", "give the node's own .json/.jsonl/.csv/.parquet file")
    text = str(path)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # a TOML literal string: backslashes stay as they are
    if '"' not in text and "\n" not in text:
        return json.dumps(text)  # a TOML basic string (JSON's escapes are a subset of TOML's)
    raise ConfigError(f"data file path '{text}' contains both quote characters", "rename it or move it to a simpler path")


def write_connection(flwr_home: Path, name: str, address: str, insecure: bool, root_certificates: Path | None) -> None:
    """A ``flwr`` CLI connection profile in ``$FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f'root-certificates = "{Path(root_certificates).expanduser().absolute()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


# -- process lifetime --------------------------------------------------------------------------------------


class ManagedProcess:
    """A Flower process we started, stopped together with everything it started."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)
        self.pid = self.process.pid
        self._known: dict[int, object] = {}

    def alive(self) -> bool:
        return self.process.poll() is None

    def descendants(self) -> list:
        """Remember (and return) every process below this one still alive."""
        import psutil

        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                self._known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return list(self._known.values())

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM this process (Flower's children follow their parent), wait, then SIGKILL by PID
        every remembered descendant still running."""
        import psutil

        family = self.descendants()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        gone, alive = psutil.wait_procs(family, timeout=grace)
        for proc in alive:
            try:
                proc.kill()  # psutil checks it is still the process we saw (PID reuse safe)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_healthy(host: str, port: int, timeout: float, ca: Path | None = None, process: ManagedProcess | None = None) -> None:
    """Poll ``/health`` of a SuperLink until it answers (FlowerError after ``timeout`` or when the
    process exits)."""
    scheme = "https" if ca is not None else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/health"
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise FlowerError(f"the SuperLink exited before it was ready:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310 (our own SuperLink)
                if response.status == 200:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise FlowerError(f"the SuperLink at {host}:{port} did not answer /health within {timeout:g}s")


def run_flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI and return the completed process (output captured)."""
    return subprocess.run([executable("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
