"""Several JAX processes (one per host, or several on one machine): start-up, a watchdog that
stops a process whose peer died, agreement between processes, and per-process batch rows.

* :func:`initialize_distributed` runs ``jax.distributed.initialize`` when the environment describes a
  multi-process run (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``,
  as ``spmd-lora launch`` sets them, or SLURM / Open MPI with more than one task), then starts
  the watchdog. It returns whether the run has more than one process. Before that it points
  file descriptor 1 at stderr and gives Python's ``sys.stdout`` a private copy of the real
  stdout: the gloo runtime (C++) writes connection notes ("[Gloo] Rank 1 is connected to 1
  peer ranks ...") to descriptor 1, cut at arbitrary bytes into our own output, and stdout
  is kept for results (eval's JSON line, completions) that users pipe.
* The watchdog is a daemon thread. Every ``interval`` seconds it writes a counter under
  ``spmd_lora/alive/<rank>`` in the JAX coordination service's key-value store and reads every
  peer's counter (one ``key_value_dir_get``). A peer whose counter has not moved for
  ``peer_timeout`` seconds (local clock, no clock sync needed) stopped responding: the
  watchdog prints ``error: process K stopped responding ...`` and ends this process with
  status :data:`EXIT_PEER_LOST` at once (``os._exit``: a collective waiting for the dead peer
  would never return). A peer that failed with an error marks itself ``failed`` first, so the
  others stop at once (``error: process K failed ...``); one that finished marks itself
  ``done`` and is no longer watched. A failing process 0 waits (up to ``peer_timeout``) until
  the others have marked themselves before it exits, since they need the coordination service
  it hosts to do so.
  ``peer_timeout`` is ``$SPMD_LORA_PEER_TIMEOUT`` (seconds, default 60). JAX's own heartbeat
  timeout is set to four times that (at least 30 s), as a backstop: it aborts the process (status 134, JAX's own
  message) if the watchdog itself cannot run. When process 0 dies, JAX's runtime aborts the
  others at once, because process 0 hosts the coordination service (its message: "Failed to
  send RPC to coordination service. Either the leader task was killed ..."); no Python code
  can run first, so that case has JAX's message instead of ours.
* :func:`agree` gives every process the list of one string per process (a barrier through the
  key-value store); checkpoint resume uses it so no process resumes from a checkpoint another
  one cannot see.
* :func:`await_watchdog`: a collective that fails because a peer's connection dropped (gloo
  raises at once when a peer process dies) waits for the watchdog's verdict, so the process
  still ends with ``error: process K stopped responding`` rather than a traceback.
* :func:`finish` ends a process of a multi-process run: marks it done or failed, and on failure
  exits at once (``os._exit``), skipping JAX's shutdown barrier, which would wait for peers
  that are themselves waiting for this process in a collective.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import jax
from ..errors import ConfigError

#: Exit status of a process stopped because a peer died, hangs or failed.
EXIT_PEER_LOST = 3
DEFAULT_PEER_TIMEOUT = 60.0
_PREFIX = "spmd_lora/alive/"
_state = {"watchdog": None, "agree_calls": 0}
_ending = threading.Lock()      # one of _stop and stand_down decides how this process ends
JAX_HEARTBEAT_FACTOR = 4   # JAX's heartbeat timeout, in peer timeouts (a backstop)


def peer_timeout() -> float:
    """Seconds without a peer's heartbeat before it counts as dead ($SPMD_LORA_PEER_TIMEOUT)."""
    text = os.environ.get("SPMD_LORA_PEER_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_PEER_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"SPMD_LORA_PEER_TIMEOUT={text!r} must be a positive number of seconds")
    return value


def _wanted() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or \
        int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed() -> bool:
    """Start multi-process JAX when the environment asks for it (see the module docstring);
    call before any other JAX call. Returns True when there is more than one process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not _wanted():
        return False
    timeout = peer_timeout()
    _keep_stdout_for_results()
    # JAX counts its timeout from the last heartbeat it received, which may predate a death
    # by one heartbeat interval: 4x leaves the watchdog (timeout + one poll) a wide lead.
    kwargs = {"heartbeat_timeout_seconds": max(int(JAX_HEARTBEAT_FACTOR * timeout), 30)}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs.update(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    if jax.process_count() > 1:
        start_watchdog(timeout)
    return jax.process_count() > 1


def _keep_stdout_for_results() -> None:
    """See the module docstring. Nothing happens when ``sys.stdout`` is not descriptor 1
    (already redirected, or captured)."""
    try:
        if sys.stdout.fileno() != 1:
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(results, "w", buffering=1, encoding=sys.stdout.encoding,
                      errors=sys.stdout.errors)


def _client():
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def multi_process() -> bool:
    return jax.process_count() > 1


class _Watchdog(threading.Thread):
    """See the module docstring."""

    def __init__(self, timeout: float):
        super().__init__(name="spmd_lora-watchdog", daemon=True)
        self.timeout = timeout
        self.interval = min(max(timeout / 6, 0.5), 10.0)
        self.me, self.n = jax.process_index(), jax.process_count()
        self.client = _client()
        self.stopped = threading.Event()

    def publish(self, value: str) -> None:
        self.client.key_value_set(_PREFIX + str(self.me), value, allow_overwrite=True)

    def run(self) -> None:
        start = time.monotonic()
        seen = {k: (None, start) for k in range(self.n) if k != self.me}
        beat, unreachable_since = 0, None
        while not self.stopped.is_set():
            beat += 1
            now = time.monotonic()
            try:
                self.publish(str(beat))
                values = dict(self.client.key_value_dir_get(_PREFIX))
                unreachable_since = None
            except Exception as e:                   # the coordinator (process 0) is gone
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.timeout and not self.stopped.is_set():
                    _stop(f"process 0 stopped responding (the coordination service it hosts "
                          f"has been unreachable for {self.timeout:.0f} s: "
                          f"{str(e).splitlines()[0][:200]})", coordinator_reachable=False)
                self.stopped.wait(self.interval)
                continue
            for k in list(seen):
                value = values.get(_PREFIX + str(k))
                if value == "done":
                    del seen[k]
                elif value is not None and value.startswith("failed"):
                    _stop(f"process {k} failed ({value[7:] or 'see its output'})")
                elif value != seen[k][0]:
                    seen[k] = (value, now)
                elif now - seen[k][1] > self.timeout:
                    _stop(f"process {k} stopped responding (no heartbeat for "
                          f"{now - seen[k][1]:.0f} s: it died, was killed or hangs)")
            self.stopped.wait(self.interval)


def _stop(reason: str, coordinator_reachable: bool = True) -> None:
    """Print why, then end this process at once (peers may be stuck in a collective)."""
    _ending.acquire()                 # never released: this process ends here
    dog = _state["watchdog"]
    if dog is not None and dog.stopped.is_set():
        _ending.release()
        return                          # finishing, or failing with its own error: not stopped
    if dog is not None and coordinator_reachable:
        try:                          # process 0 waits for this before it exits (finish)
            dog.publish("failed:stopped")
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.write(f"error: {reason}; stopping process {jax.process_index()}\n")
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)


def start_watchdog(timeout: float | None = None) -> None:
    if _state["watchdog"] is None:
        _state["watchdog"] = _Watchdog(peer_timeout() if timeout is None else timeout)
        _state["watchdog"].start()


def await_watchdog(error: BaseException) -> None:
    """After a JAX runtime error in a multi-process run (gloo raises one as soon as a peer's
    connection drops: ``Gloo all-reduce failed: ... Connection closed by peer``), give the
    watchdog the time it needs to name the process that stopped; it then ends this process
    with ``error: process K stopped responding``. Returns when it did not (another error)."""
    dog = _state["watchdog"]
    if dog is None or not isinstance(error, jax.errors.JaxRuntimeError):
        return
    first = (str(error).strip().splitlines() or [""])[0][:300]
    sys.stderr.write(f"note: a JAX runtime error in a multi-process run ({first}); waiting up to "
                     f"{dog.timeout + 2 * dog.interval:.0f} s for the watchdog to see whether a "
                     f"peer process stopped\n")
    sys.stderr.flush()
    time.sleep(dog.timeout + 2 * dog.interval)


def stand_down() -> None:
    """This process failed with its own error, which :func:`finish` is about to report: from
    now on its watchdog no longer ends it for a peer's failure (which would replace its own
    error and exit status with the peer's)."""
    with _ending:
        if _state["watchdog"] is not None:
            _state["watchdog"].stopped.set()


def finish(status: int, message: str = "") -> int:
    """End this process's part of a multi-process run with exit ``status``: marks it ``done``
    (status 0) or ``failed`` for the others' watchdogs; a failure exits at once. Returns
    ``status`` when it returns (single process, or success)."""
    dog = _state["watchdog"]
    if dog is None:
        return status
    dog.stopped.set()
    try:
        dog.publish("done" if status == 0 else f"failed:{message[:200]}")
    except Exception:
        pass
    if status != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        if dog.me == 0:      # the others still need the coordination service it hosts
            _wait_for_peers(dog)
        os._exit(status)
    return status


def _wait_for_peers(dog: _Watchdog) -> None:
    """Until every peer has marked itself done or failed (or ``peer_timeout`` passed)."""
    deadline = time.monotonic() + dog.timeout
    while time.monotonic() < deadline:
        try:
            values = dict(dog.client.key_value_dir_get(_PREFIX))
        except Exception:
            return
        if all(str(values.get(_PREFIX + str(k), "")).startswith(("done", "failed"))
               for k in range(dog.n) if k != dog.me):
            return
        time.sleep(0.1)


def agree(value: str, timeout_s: float = 1800.0) -> list[str]:
    """Every process's ``value``, in rank order (all processes must call it, in the same order).
    One process: ``[value]``."""
    if not multi_process():
        return [value]
    _state["agree_calls"] += 1
    key = f"spmd_lora/agree/{_state['agree_calls']}/"
    client = _client()
    client.key_value_set(key + str(jax.process_index()), value)
    return [client.blocking_key_value_get(key + str(k), int(timeout_s * 1000))
            for k in range(jax.process_count())]
