"""``botp web --processes N``: N web processes on one port, for a machine with N cores.

Why: a Python process runs on one core. On PostgreSQL every web process takes webhooks,
runs turns and sends its own turns' replies (``own_replies``), so the web tier grows by
adding processes; on one machine this is the way to use its other cores without a
balancer in front. The parent binds the port (a taken port fails at once, before
anything forks), forks the processes and supervises them:

- each child builds its own platform after the fork (its own connection pool, its own
  lease identity for the replies it sends), and the kernel hands each new connection to
  one of them;
- only the first polls bots or registers their webhooks (Telegram allows one
  ``getUpdates`` caller per bot; one registration is enough);
- SIGTERM or SIGINT is passed on to every child and waited for (each stops as a single
  ``botp web`` does: sends in flight finish and are recorded);
- a child that dies stops the others, and the parent exits with its code: the service
  manager restarts the whole, instead of a service at part capacity that looks healthy.

SQLite is refused (by the command line): it has one writer, so a second process would
only queue behind it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from types import FrameType

from bot_platform.config import Settings
from bot_platform.serve import listen

log = logging.getLogger("botp")

# What a child that failed without an exit code of its own exits with (EX_SOFTWARE).
CHILD_FAILED = 70
PR_SET_PDEATHSIG = 1  # prctl(2)


# One child's whole life: serve on the socket (the first one also polls bots and
# registers webhooks); returns the process's exit code.
ServeOne = Callable[[socket.socket, bool], int]


def serve_processes(settings: Settings, count: int, serve_one: ServeOne) -> int:
    """Fork ``count`` web processes sharing one listening socket and wait for them;
    the exit code of the first that failed, else 0. Raises ``PortInUse`` before any
    fork when the port is taken. PostgreSQL only (the command line refuses SQLite)."""
    sock = listen(settings.host, settings.port)
    sys.stdout.flush()
    sys.stderr.flush()
    children: dict[int, int] = {}
    parent = os.getpid()
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            code = CHILD_FAILED
            try:
                _end_with(parent)
                code = serve_one(sock, index == 0)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    sock.close()  # the children hold it
    log.info("web: %d processes (pids %s)", count, ", ".join(map(str, children)))
    return _supervise(children)


def _end_with(parent: int) -> None:
    """Have the kernel send this child SIGTERM when the parent dies (Linux), so a
    supervisor killed outright leaves no web processes holding the port unsupervised."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own signals stop us
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(children: dict[int, int]) -> int:
    """Wait for every child; on a stop signal, or when one child ends unasked, stop
    the rest. The first failure's exit code (a child killed by signal S: 128 + S)."""
    stopping = False

    def stop_all(signum: int | None = None, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_all)
    code = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            if exit_code and not code:
                code = exit_code if exit_code > 0 else 128 - exit_code
            continue
        log.error("web process %d (pid %d) ended on its own (%s); stopping the others",
                  index + 1, pid, f"exit code {exit_code}" if exit_code >= 0
                  else f"signal {signal.Signals(-exit_code).name}")
        code = exit_code if exit_code > 0 else (128 - exit_code if exit_code else 1)
        stop_all()
    return code
