"""Starting the model party in its own process on loopback, and stopping it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from atoll.split.channel import SplitProtocolError
from atoll.split.server import READY

LOG_FILE = "server.log"


class ModelPartyProcess:
    """``python -m atoll.split.server CONFIG --out DIR`` on 127.0.0.1 with a free port."""

    def __init__(self, config_path: Path, out_dir: Path, startup_timeout: float = 300.0):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = out_dir / LOG_FILE
        self._log = open(self.log_path, "w")
        command = [
            sys.executable,
            "-m",
            "atoll.split.server",
            str(config_path),
            "--out",
            str(out_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.port = self._wait_ready(startup_timeout)
        self.address = f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float) -> int:
        found: list[int] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith(READY):
                    found.append(int(line.split()[1]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.kill()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] if self.log_path.is_file() else []
            raise SplitProtocolError(f"the model party process did not start: {tail[0] if tail else 'no output'}", f"see {self.log_path}")
        return found[0]

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self._log.closed:
            self._log.close()
