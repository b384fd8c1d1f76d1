"""``spmd-lora launch``: run one spmd-lora command as N JAX processes on this machine.

``spmd-lora launch --nprocs 2 [--devices-per-process 4] -- train --model ... --tp 4 --dp 2``
starts ``python -m spmd_lora train ...`` N times with ``JAX_COORDINATOR_ADDRESS`` (a free
loopback port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, the same variables a multi-host
run sets by hand (see the README), and ``SPMD_LORA_LOCAL_PROCESSES`` (N: they share this
host's memory, which the host budget check counts). On CPU each process gets ``--devices-per-process`` devices
(``JAX_NUM_CPU_DEVICES`` and ``XLA_FLAGS=--xla_force_host_platform_device_count``); on an
NVIDIA host the local GPUs are split across the processes (``JAX_LOCAL_DEVICE_IDS``).

* Output: every line a process prints is prefixed with ``[rank K]`` (stdout to stdout, stderr
  to stderr); ``launch: rank K pid P`` is printed for each process at the start. Gloo's
  "Rank R is connected to N peer ranks" notes (one per communicator, on CPU) are folded into
  one ``gloo: connected to its peers`` line per process; a note with fewer peers than
  expected is shown as is.
* First failure: when a process exits non-zero, the others are stopped (SIGKILL: a run that
  lost a process cannot go on, and checkpoints are written atomically) and the launcher prints
  ``error: process K ...`` with its exit status and its last error line (the last line that
  starts with ``error:``, else the exception line that ends a traceback; never a progress
  line), and exits with that status (128 + signal for a signal).
  Processes that only stopped because of that one (the watchdog's status 3, or JAX's abort
  when process 0 died) are not the one reported.
* SIGTERM / SIGINT / SIGHUP to the launcher stop every process (SIGTERM, then SIGKILL after
  ``--grace`` seconds; JAX catches SIGTERM as a preemption notice); the processes also
  get SIGKILL when the launcher itself dies (Linux ``PR_SET_PDEATHSIG``). No orphans.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .distributed import EXIT_PEER_LOST, peer_timeout as default_peer_timeout
from ..errors import ConfigError

_JAX_PEER_ABORT = "JAX distributed service detected fatal errors"
# Gloo's note, one per communicator; several communicators of a process write theirs from
# their own threads at once, so notes arrive cut anywhere and interleaved ("[Gloo] Rank 2 is
# connected to [Gloo] Rank 0 is connected ..."): a line with a note or its "[Gloo]" marker
# whose every word is a piece of the note's text is folded.
_GLOO_NOTE = re.compile(r"is connected to (\d+) peer ranks\. "
                        r"Expected number of connected peer ranks is : (\d+)")
_GLOO_TEXT = ("[Gloo] Rank N is connected to N peer ranks. Expected number of connected peer "
              "ranks is : N")
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_gpus() -> list[str]:
    """Local NVIDIA GPU ids (``CUDA_VISIBLE_DEVICES`` or the driver's list); [] on CPU."""
    if "cpu" in os.environ.get("JAX_PLATFORMS", "").split(","):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v for v in visible.split(",") if v.strip()]
    gpus = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []


def child_envs(nprocs: int, devices_per_process: int | None, port: int,
               peer_timeout: float | None = None, base: dict | None = None) -> list[dict]:
    """The environment of each process (see the module docstring)."""
    base = dict(os.environ if base is None else base)
    gpus = _local_gpus()
    per = devices_per_process
    if gpus:
        per = per or len(gpus) // nprocs
        if per < 1 or per * nprocs > len(gpus):
            raise ConfigError(f"--nprocs {nprocs} x --devices-per-process {per} needs "
                              f"{nprocs * max(per, 1)} GPUs but this host has {len(gpus)}")
    per = per or 1
    envs = []
    for rank in range(nprocs):
        env = {**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": str(nprocs), "JAX_PROCESS_ID": str(rank),
               "SPMD_LORA_LOCAL_PROCESSES": str(nprocs), "PYTHONUNBUFFERED": "1"}
        if peer_timeout is not None:
            env["SPMD_LORA_PEER_TIMEOUT"] = str(peer_timeout)
        if gpus:
            env["JAX_LOCAL_DEVICE_IDS"] = ",".join(gpus[rank * per:(rank + 1) * per])
        else:
            flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={per}".strip()
            env["JAX_NUM_CPU_DEVICES"] = str(per)
        envs.append(env)
    return envs


def _die_with_parent() -> None:
    """Child side: get SIGKILL when the launcher dies (Linux; a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Rank:
    """One child process, its output pumps and what it last said on stderr."""

    def __init__(self, rank: int, proc: subprocess.Popen):
        self.rank, self.proc = rank, proc
        self.last_error = ""           # the last "error:" line or a traceback's exception line
        self.last_line = ""            # the last non-empty stderr line
        self.peer_abort = False        # JAX's runtime aborted it because a peer died
        self.in_traceback = False      # between "Traceback ..." and its exception line
        self.gloo_noted = False        # its one folded Gloo line was printed
        self.pumps = []

    def saw(self, line: str) -> None:
        """Follow one non-empty stderr line: the last error line, a peer abort."""
        self.last_line = line
        if line.startswith("error:"):
            self.last_error, self.in_traceback = line, False
        elif line.startswith("Traceback (most recent call last)"):
            self.in_traceback = True
        elif self.in_traceback and not line[:1].isspace() and not line.startswith(
                ("During handling of the above", "The above exception")):
            self.last_error, self.in_traceback = line, False    # e.g. "ValueError: ..."
        if _JAX_PEER_ABORT in line:
            self.peer_abort = True

    def shown(self, line: str) -> str | None:
        """The line as printed (None: folded away). Gloo's connection notes, one per
        communicator, become one line per process; a short-handed one is shown as is."""
        notes = _GLOO_NOTE.findall(line)
        if not (notes or "[Gloo]" in line) or any(have != want for have, want in notes):
            return line
        # a piece ends where the next note's "[Gloo]" begins, with or without a space
        words = re.split(r"\s+|(?=\[Gloo\])", line)
        if not all(re.sub(r"\d+", "N", word) in _GLOO_TEXT for word in words):
            return line
        if self.gloo_noted:
            return None
        self.gloo_noted = True
        return "gloo: connected to its peers (further notes of this kind hidden)"


def _pump(stream, out, lock, rank: _Rank, is_err: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if is_err and line.strip():
            rank.saw(line.rstrip())
            line = rank.shown(line)
            if line is None:
                continue
        with lock:
            out.write(f"[rank {rank.rank}] {line}\n")
            out.flush()
    stream.close()


def _status_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def run(command: list[str], nprocs: int, devices_per_process: int | None = None, port: int = 0,
        grace: float = 3.0, peer_timeout: float | None = None) -> int:
    """Run ``python -m spmd_lora COMMAND`` as ``nprocs`` processes; returns the exit status."""
    if nprocs < 1:
        raise ConfigError(f"--nprocs must be >= 1, got {nprocs}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ConfigError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("no command to launch: put the spmd-lora command after --, e.g. "
                          "spmd-lora launch --nprocs 2 -- train --model ...")
    if command[0] in ("launch", "demo", "dashboard", "plot", "export", "plan"):
        raise ConfigError(f"launch runs train, eval or generate, not {command[0]!r}")
    envs = child_envs(nprocs, devices_per_process, port or _free_port(), peer_timeout)

    def on_signal(signum, frame):
        raise _Stop(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    ranks: list[_Rank] = []
    lock = threading.Lock()
    try:
        for rank, env in enumerate(envs):
            proc = subprocess.Popen([sys.executable, "-m", "spmd_lora", *command], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=_die_with_parent)
            ranks.append(_Rank(rank, proc))
            with lock:
                sys.stderr.write(f"launch: rank {rank} pid {proc.pid}\n")
                sys.stderr.flush()
        for r in ranks:
            for stream, out, is_err in ((r.proc.stdout, sys.stdout, False),
                                        (r.proc.stderr, sys.stderr, True)):
                t = threading.Thread(target=_pump, args=(stream, out, lock, r, is_err), daemon=True)
                t.start()
                r.pumps.append(t)
        # a failing process 0 waits up to the peer timeout for the others before it exits
        # (distributed.finish), so a victim's cause may end that much after the victim
        failed = _wait(ranks, cause_grace=(peer_timeout or default_peer_timeout()) + 5.0)
    except _Stop as stop:
        _stop_all(ranks, grace)
        sys.stderr.write(f"error: launch stopped by {signal.Signals(stop.signum).name}; "
                         f"stopped all {len(ranks)} processes\n")
        return 128 + stop.signum
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if failed is None:
        for r in ranks:
            for t in r.pumps:
                t.join()
        return 0
    _stop_all(ranks, 0.0)          # a failed run cannot go on: SIGKILL the others at once
    code = failed.proc.returncode
    said = (f"its last error line: {failed.last_error}" if failed.last_error
            else "it printed no error line")
    sys.stderr.write(f"error: process {failed.rank} (pid {failed.proc.pid}) failed: "
                     f"{_status_text(code)}; {said}; the other processes were stopped\n")
    sys.stderr.flush()
    return _exit_code(code)


# a victim's line when its peer failed with an error (distributed._stop), not when it vanished;
# searched anywhere in the line, which another thread's output may have joined
_PEER_FAILED = re.compile(r"error: process \d+ failed \(")
VANISHED_CAUSE_GRACE = 10.0     # seconds a victim's vanished peer may take to be seen exiting


def _victim(r: _Rank) -> bool:
    """Stopped only because another process died or failed."""
    return r.proc.returncode == EXIT_PEER_LOST or r.peer_abort


def _wait(ranks: list[_Rank], cause_grace: float) -> _Rank | None:
    """Wait until all exit 0 (-> None) or one fails (-> the rank to report: the first seen to
    fail that was not only reacting to another's failure). After a victim, the cause is waited
    for up to ``cause_grace`` seconds when the victim says its peer failed with an error (that
    peer may still be waiting for the others before it exits), else ``VANISHED_CAUSE_GRACE``."""
    ended: dict[int, float] = {}

    def failed():
        now = time.monotonic()
        for r in ranks:
            if r.proc.poll() is not None and r.rank not in ended:
                ended[r.rank] = now
                for t in r.pumps:
                    t.join(timeout=2.0)    # its last lines, and whether JAX aborted it
        return sorted((r for r in ranks if r.proc.returncode not in (None, 0)),
                      key=lambda r: ended[r.rank])

    while True:
        bad = failed()
        if bad:
            # a victim exits moments after the process it reacted to, or, when that one
            # failed with an error, possibly before it (see run): wait for that one
            reported_failure = any(_PEER_FAILED.search(r.last_line) for r in bad)
            deadline = time.monotonic() + (cause_grace if reported_failure
                                           else VANISHED_CAUSE_GRACE)
            while all(_victim(r) for r in bad) and time.monotonic() < deadline:
                time.sleep(0.05)
                bad = failed()
            causes = [r for r in bad if not _victim(r)]
            return (causes or bad)[0]
        if len(ended) == len(ranks):
            return None
        time.sleep(0.1)


def _stop_all(ranks: list[_Rank], grace: float) -> None:
    """SIGTERM every running process, SIGKILL what is left after ``grace`` seconds (at once
    when 0), reap all. JAX catches SIGTERM in a multi-process run (a preemption notice for
    its sync manager), so a busy process usually ends at the SIGKILL."""
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.terminate() if grace > 0 else r.proc.kill()
    deadline = time.monotonic() + grace
    for r in ranks:
        try:
            r.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
    for r in ranks:
        for t in r.pumps:
            t.join(timeout=2.0)
