"""Worker processes of sweeps (training, evaluation): ``normlab ARGV`` in a process of its own
per run, without paying Python's and torch's imports each time.

A new interpreter spends 3-4 s importing torch, normlab's CLI and trainer, and torch._dynamo
(which torch.optim imports when it builds the first optimizer): about as long as a smoke-sized
run trains, once per run of a sweep. So each of the ``jobs`` slots of a ``WorkerPool`` is a
server (``SERVER``) that imports them once, then forks one child per command: every run still
gets a fresh process (its own memory, RNG and exit status), and the caller's ``__main__`` is
never imported again, unlike with multiprocessing's forkserver. The server runs no torch
operation before it forks, so no thread pool is copied into a child. Without ``os.fork``
(Windows) each command is a new interpreter.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: what the servers import before their first fork, besides the CLI (SERVER)
PRELOAD = ("normlab.train.trainer", "torch._dynamo")
#: a server's program. From its first line a Ctrl-C is only noted: the runs (children) handle
#: it themselves and exit 130; a server that got one answers 130 to later commands unrun
SERVER = ("import signal, sys; noted = []; signal.signal(signal.SIGINT, lambda *_: noted.append(True)); "
          "from normlab.cli import main; from normlab.workers import serve; serve(sys.stdin, sys.stdout, noted, main)")


def log_tail(log: Path, code: int) -> str:
    """The last line a worker wrote to ``log`` (its result or its error), else its exit status."""
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {code}"


class WorkerPool:
    """``jobs`` worker slots; ``run(argv, log)`` may be called from up to ``jobs`` threads at once
    and returns the exit status of ``normlab ARGV`` (negative: killed by that signal), its stdout
    and stderr in ``log``; each worker has cpu_count / jobs threads. Use it as a context manager:
    leaving it stops the servers."""

    def __init__(self, jobs: int) -> None:
        self.jobs, self.threads = jobs, max(1, (os.cpu_count() or 1) // jobs)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        self.forks = hasattr(os, "fork")
        self.idle: queue.Queue[subprocess.Popen] = queue.Queue()
        self.started = 0
        self.lock = threading.Lock()

    def _server(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=self.env, text=True)

    def _take(self) -> subprocess.Popen:
        """An idle server, a new one while fewer than ``jobs`` exist, else the next to finish."""
        with self.lock:
            if self.idle.empty() and self.started < self.jobs:
                self.started += 1
                return self._server()
        return self.idle.get()

    def run(self, argv: list[str], log: Path) -> int:
        log.write_bytes(b"")  # created here: a child that dies before writing leaves it empty
        if not self.forks:
            with open(log, "wb") as sink:
                return subprocess.run([sys.executable, "-m", "normlab.cli", *argv], env=self.env, stdout=sink,
                                      stderr=subprocess.STDOUT).returncode
        server = self._take()
        try:
            server.stdin.write(json.dumps({"argv": argv, "log": str(log), "threads": self.threads}) + "\n")
            server.stdin.flush()
            reply = server.stdout.readline()
        except OSError:  # the server is gone (killed): this run failed, the next one gets a new server
            reply = ""
        if reply:
            code = int(reply)
        else:  # Ctrl-C before the server set its handler ends it with SIGINT: the run is interrupted
            server.kill()
            code = 130 if server.wait() == -signal.SIGINT else 1
            server = self._server()
        self.idle.put(server)
        return code

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        while not self.idle.empty():
            server = self.idle.get()
            server.stdin.close()
            server.wait()


def serve(commands: IO[str], replies: IO[str], interrupted: list, main: Callable[[list[str]], int]) -> None:
    """The server: import ``PRELOAD``, then for each command line ({"argv", "log", "threads"})
    fork a child that runs ``main(argv)`` (the CLI's) and reply with the child's exit status, or
    with 130 without running it once ``interrupted`` (the server's Ctrl-C) is true; ends when its
    input closes."""
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # the child imports what it needs and logs the error
            importlib.import_module(module)
    for line in commands:
        if interrupted:
            replies.write("130\n")
            replies.flush()
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job, main)
        _, status = os.waitpid(pid, 0)  # a noted Ctrl-C does not break it off (PEP 475)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
        replies.flush()


def _child(job: dict, main: Callable[[list[str]], int]) -> None:
    """Run one command in the forked child and leave with its exit status (never returns)."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sink = os.open(job["log"], os.O_WRONLY | os.O_TRUNC)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the command pipe is the server's
        for stream in (sys.stdout, sys.stderr):
            os.dup2(sink, stream.fileno())
            stream.reconfigure(line_buffering=True)  # stdout and stderr keep their order in the log
        import torch

        torch.set_num_threads(job["threads"])
        code = main(job["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - nothing may keep the child from exiting here
                pass
        os._exit(code if isinstance(code, int) else 1)
