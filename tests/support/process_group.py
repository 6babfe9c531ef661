"""Run a test worker script as several JAX processes on localhost (gloo collectives on CPU): the
coordinator port, retries when another program took it, stopping the peers of a failed process, and the Python
stacks of a group that hangs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240  # generous: JAX processes start, compile and talk over gloo on 2 shared cores
# The proxy variables, which the loopback Cloud Storage server sets for the session (see worker_env).
PROXY_KEYS = {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy"}
# Each worker runs under this launcher: SIGUSR1 prints every thread's Python stack, which is how a group that hangs
# is reported (processes that took different branches wait for each other in mismatched collectives for good).
LAUNCHER = ("import faulthandler, runpy, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
# Failures that mean the coordinator port was taken by someone else are retried.
PORT_TAKEN = ("address already in use", "failed to add port", "could not bind", "failed to bind", "errno 98")
ATTEMPTS = 3


def reserve_port(hold: bool):
    """(socket or None, port): port 0 bound by the OS. With ``hold`` the socket stays bound (SO_REUSEPORT, not
    listening) until the workers end, so no other program takes the port meanwhile; gRPC binds with
    SO_REUSEPORT too. Without it the port is released first (the fallback if that bind is refused)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hold and hasattr(socket, "SO_REUSEPORT"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
    if not hold:
        s.close()
        return None, port
    return s, port


def worker_env() -> dict:
    """The environment of a worker process, without XLA_FLAGS (each sets its device count). The loopback Cloud
    Storage server (the gcs_server fixture) points the proxy variables at itself for the rest of the session; the
    processes' coordinator (gRPC on localhost) must not go through it: they get the session's original proxy
    settings."""
    from tests.conftest import ENV_AT_START  # noqa: PLC0415  (the environment before any fixture changed it)

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and k not in PROXY_KEYS}
    env.update({k: ENV_AT_START[k] for k in PROXY_KEYS if k in ENV_AT_START})
    return env


def _run_once(script, nproc, argv, hold, timeout_s):
    sock, port = reserve_port(hold)
    env = worker_env()
    logs = [tempfile.TemporaryFile("w+") for _ in range(nproc)]
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCHER, os.path.join(HERE, script)]
                              + [str(a) for a in argv(pid, port)],
                              env=env, stdout=logs[pid], stderr=subprocess.STDOUT, text=True)
             for pid in range(nproc)]
    deadline = time.monotonic() + timeout_s
    hung = False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # a failed process leaves its peers waiting for it: stop them
            if time.monotonic() > deadline:
                hung = True
                break
            time.sleep(0.2)
    finally:
        if hung:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(2)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if sock is not None:
            sock.close()
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return [p.returncode for p in procs], texts, hung


def run_workers(script: str, nproc: int, argv, what: str, timeout_s: int = TIMEOUT_S) -> None:
    """``tests/<script>`` as ``nproc`` processes, ``argv(pid, port)`` giving each its arguments; asserts that
    all exit 0, naming ``what`` and the failing process's log (for a group that hung: every thread's stack)."""
    for attempt in range(ATTEMPTS):
        codes, logs, hung = _run_once(script, nproc, argv, hold=attempt == 0, timeout_s=timeout_s)
        port_taken = any(c != 0 for c in codes) and any(k in log.lower() for log in logs for k in PORT_TAKEN)
        if not port_taken:
            break
    # A hang shows in the stacks of all processes together (where each one waits); a failure in its own log.
    assert not hung, f"{what} hung for {timeout_s} s: " + "".join(
        f"\n--- process {pid} (rc {code}) ---\n{log[-5000:]}" for pid, (code, log) in enumerate(zip(codes, logs)))
    for pid, (code, log) in enumerate(zip(codes, logs)):
        assert code == 0, f"{what} process {pid} (rc {code}): {log[-3000:]}"
