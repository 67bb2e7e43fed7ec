"""Worker processes on this host: ``celery -A workers worker`` subprocesses.

Each child gets ``PR_SET_PDEATHSIG`` so that it dies with the process that started it,
and is stopped with SIGTERM, a Celery warm shutdown: the running batch finishes and the
waiting requests go back to their queues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from common.redis import die_with_parent

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(
        self,
        hostname: str,
        *,
        queues: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        loglevel: str = "INFO",
        extra_args: list[str] | None = None,
        app: str = "workers",
    ) -> None:
        self.hostname = hostname
        self.log_path = log_path
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-n", hostname, "--loglevel", loglevel, "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        if queues:
            command += ["-Q", ",".join(queues)]
        command += extra_args or []
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._log if self._log else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Ask for a warm shutdown without waiting for it."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def stop(self, *, timeout_s: float = 30.0) -> int:
        """Warm shutdown; SIGKILL if it has not ended after ``timeout_s``."""
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()
        return int(self.proc.returncode)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 6000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]
