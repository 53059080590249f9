"""The serving benchmark waits for every server to stop working before the next cell and the
ceiling measured for it: a real process burning CPU keeps it waiting until it stops."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.loadgen import Server, wait_quiet


class Process(Server):
    """A Server around any command, without the HTTP readiness check."""

    def __init__(self, code: str) -> None:  # Server.__init__ would wait for HTTP readiness
        self.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_waits_while_a_server_burns_cpu_and_not_once_it_stops() -> None:
    started = time.monotonic()
    busy = Process("import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
                   "time.sleep(60)")  # fmt: skip
    idle = Process("import time; time.sleep(60)")
    try:
        time.sleep(0.2)
        waited = wait_quiet([busy, idle], window=0.2)
        # Not before the busy loop has ended (1.5 s after its start), and not at the timeout.
        assert time.monotonic() - started >= 1.5 and waited < 10, waited
        assert wait_quiet([busy, idle], window=0.2) < 0.5  # both quiet now: one window
    finally:
        busy.stop()
        idle.stop()
