"""Several JAX processes on this machine (gloo collectives on CPU), against the 1-process run.

Each multi-process run is ``spmd-lora launch`` (or, where a test says so, the processes started
by hand with the launcher's environment variables, as SLURM / mpirun would) on the tiny model.
The oracle is the same config trained in this pytest process on 8 devices.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from spmd_lora import cli
from spmd_lora.runtime import distributed, launch
from spmd_lora.data import BatchIterator
from spmd_lora.parallel.mesh import make_mesh
from spmd_lora.parallel.placement import place_micro_batches, shard_micro_batches
from spmd_lora.tiny import asset_path, build_tiny_llama
from spmd_lora.train import TrainConfig, train

DATA = str(asset_path("alpaca_sample.jsonl"))
TRAIN = dict(template="alpaca", max_seq_len=128, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
             lora_targets="all", learning_rate=3e-3, batch_size=4, seed=1, census=False)
STEPS = 24          # long enough that a SIGKILL after the first checkpoint lands mid-run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=2)


def _flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def _train_args(model, out, **kw) -> list[str]:
    return ["train", "--model", str(model), "--data", DATA, "--output", str(out),
            *_flags({**TRAIN, **kw})]


def _launch(nprocs, per, command, **popen):
    return subprocess.Popen([sys.executable, "-m", "spmd_lora", "launch", "--nprocs", str(nprocs),
                             "--devices-per-process", str(per), "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run_launch(nprocs, per, command, timeout=600):
    t0 = time.perf_counter()
    proc = _launch(nprocs, per, command)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.perf_counter() - t0


def _oracle(model, out, **kw) -> Path:
    """The same training in this process (8 devices, one process)."""
    train(TrainConfig(model=str(model), data=DATA, output_dir=str(out),
                      **{**TRAIN, "lora_targets": ("all",), **kw}))
    return out


def _losses(out):
    lines = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def _adapter(out):
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def _assert_close_runs(run, ref):
    """Same losses and adapter up to reduction order: gloo's cross-process all-reduce adds the
    8 per-device LoRA gradients in another order than the in-process one (different bits in
    the last place of grad_norm from step 1 on); Adam's 1/sqrt(v) amplifies that rounding in
    near-zero gradient entries, so the adapter agrees to 1e-5, like the tp/dp layouts do."""
    np.testing.assert_allclose(_losses(run), _losses(ref), rtol=2e-6)
    a, b = _adapter(run), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:              # a zombie is dead too (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids(stderr_lines) -> dict[int, int]:
    return {int(m[1]): int(m[2]) for l in stderr_lines
            if (m := re.match(r"launch: rank (\d+) pid (\d+)", l))}


# ---- fast, in-process ----------------------------------------------------------------------

def test_batch_rows_and_placement_match_the_whole_batch(tiny_model):
    """A process builds only some rows of a batch: the rows equal the whole batch's rows, the
    token count needs no collation, and the placed arrays equal the whole-batch placement."""
    from spmd_lora import data
    from spmd_lora.tokenizer import load_tokenizer
    examples = data.load_or_build(DATA, load_tokenizer(str(tiny_model)), "alpaca", 256)
    it = BatchIterator(examples, batch_size=4, max_seq_len=256, pack=True, seed=3)
    whole = it.batch(0, 1)
    part = it.batch(0, 1, [3, 1])
    for k in whole:
        np.testing.assert_array_equal(part[k], whole[k][[3, 1]])
    assert it.batch_tokens(0, 1) == np.count_nonzero(whole["segment_ids"])
    assert it.take() == (0, 0) and it.take() == (0, 1) and it.state()["index"] == 2
    for mesh in (make_mesh(2, 4), make_mesh(2, 2, cp=2)):     # cp: zig-zag batch preparation
        placed = place_micro_batches(it, [(0, 0), (0, 1)], mesh)
        ref = shard_micro_batches({k: np.stack([it.batch(0, 0)[k], whole[k]]) for k in whole},
                                  mesh)
        assert placed.keys() == ref.keys()
        for k in ref:
            assert placed[k].sharding == ref[k].sharding
            np.testing.assert_array_equal(np.asarray(placed[k]), np.asarray(ref[k]))
    assert distributed.agree("x") == ["x"]          # one process: no barrier


def test_launcher_environment_and_usage_errors(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    envs = launch.child_envs(2, 3, 4567, peer_timeout=9)
    assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    for e in envs:
        assert e["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567" and e["JAX_NUM_PROCESSES"] == "2"
        assert e["JAX_NUM_CPU_DEVICES"] == "3" and e["SPMD_LORA_PEER_TIMEOUT"] == "9"
        assert e["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
    for argv, msg in ((["launch", "--nprocs", "2"], "no command to launch"),
                      (["launch", "--nprocs", "0", "--", "train"], "--nprocs must be >= 1"),
                      (["launch", "--nprocs", "2", "--", "demo"], "not 'demo'")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err


def test_launcher_quotes_error_lines_and_folds_gloo_notes():
    """The failed process's error line is its last ``error:`` line or the exception line that
    ends a traceback (the last one of a chain), never a progress line; Gloo's connection notes
    fold into one line per process, a short-handed one stays."""
    def rank_after(lines):
        r = launch._Rank(0, None)
        shown = [s for line in lines if (r.saw(line), s := r.shown(line))[1] is not None]
        return r, shown

    r, _ = rank_after(["step 3/24 loss 2.1", "step 4/24 loss 2.0"])
    assert r.last_error == ""
    r, _ = rank_after(["error: --model nope: no such directory", "step 1/2"])
    assert r.last_error == "error: --model nope: no such directory"
    r, _ = rank_after(["step 1/24", "Traceback (most recent call last):",
                       '  File "x.py", line 3, in f', "    raise KeyError(1)", "    ^^^^^^",
                       "KeyError: 1", "", "During handling of the above exception, another "
                       "exception occurred:", "", "Traceback (most recent call last):",
                       '  File "y.py", line 9, in g', "ValueError: bad shape (3, 4)"])
    assert r.last_error == "ValueError: bad shape (3, 4)"
    note = "[Gloo] Rank {} is connected to {} peer ranks. Expected number of connected peer ranks is : {}"
    _, shown = rank_after([note.format(0, 1, 1), note.format(1, 1, 1), "step 1/2",
                           note.format(0, 1, 1), note.format(0, 0, 1)])
    assert shown == ["gloo: connected to its peers (further notes of this kind hidden)",
                     "step 1/2", note.format(0, 0, 1)]
    # several communicators' threads write at once: notes arrive cut and interleaved
    tail = " is connected to 7 peer ranks. Expected number of connected peer ranks is : 7"
    _, shown = rank_after(["[Gloo] Rank [Gloo] Rank 1" + tail.replace("7", "3"),
                           "0" + tail.replace("7", "3"), "[Gloo] Rank 1[Gloo] Rank 2" + tail, tail,
                           "[Gloo] Rank ", "[Gloo] Rank 2 is connected to [Gloo] Rank 0" + tail,
                           "step 1/2", "[Gloo] Rank 3" + tail.replace(": 7", ": 8"),
                           "12", "loss [Gloo] Rank 1"])
    assert shown == ["gloo: connected to its peers (further notes of this kind hidden)",
                     "step 1/2", "[Gloo] Rank 3" + tail.replace(": 7", ": 8"), "12",
                     "loss [Gloo] Rank 1"]


class _FakeClient:
    def __init__(self):
        self.kv = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.kv[key] = value


class _Exited(Exception):
    pass


def test_a_process_with_its_own_error_is_not_stopped_for_its_peers(monkeypatch, capsys):
    """The race CI once lost: both processes fail alike; process 1's watchdog saw process 0's
    failure while process 1 was printing its own error. A process that stood down (its own
    error, about to be reported) is not ended by its watchdog; one that is stopped because
    process 0 failed still marks itself failed, so process 0 (which waits for its peers) exits
    at once; only an unreachable coordinator is not written to."""
    import threading

    class Dog:
        me, stopped, client = 1, threading.Event(), _FakeClient()

        def publish(self, value):
            self.client.key_value_set(f"spmd_lora/alive/{self.me}", value)

    def exit_(status):
        raise _Exited(status)

    monkeypatch.setattr(distributed.os, "_exit", exit_)
    for reachable, marked in ((True, "failed:stopped"), (False, None)):
        dog = Dog()
        dog.stopped, dog.client = threading.Event(), _FakeClient()
        monkeypatch.setitem(distributed._state, "watchdog", dog)
        monkeypatch.setattr(distributed, "_ending", threading.Lock())
        with pytest.raises(_Exited, match=str(distributed.EXIT_PEER_LOST)):
            distributed._stop("process 0 failed (no model)", coordinator_reachable=reachable)
        assert dog.client.kv.get("spmd_lora/alive/1") == marked
        assert "error: process 0 failed (no model); stopping process" in capsys.readouterr().err
    dog.stopped = threading.Event()
    monkeypatch.setattr(distributed, "_ending", threading.Lock())
    distributed.stand_down()
    distributed._stop("process 0 failed (no model)")          # returns: it stood down
    assert capsys.readouterr().err == ""


def test_launcher_reports_the_cause_when_the_victims_line_was_joined(monkeypatch):
    """A victim's "error: process 0 failed (...)" line joined to its own error line by another
    thread still counts: the launcher waits for process 0 (the cause) beyond the short grace
    it gives a peer that vanished, and reports it."""
    class Proc:
        def __init__(self, pid, code, after):
            self.pid, self.code, self.at, self.returncode = pid, code, time.monotonic() + after, None

        def poll(self):
            if self.returncode is None and time.monotonic() >= self.at:
                self.returncode = self.code
            return self.returncode

    monkeypatch.setattr(launch, "VANISHED_CAUSE_GRACE", 0.2)
    cause, victim = launch._Rank(0, Proc(10, 2, 0.8)), launch._Rank(1, Proc(11, 3, 0.0))
    cause.saw("error: model directory not found: nope")
    victim.saw("error: model directory not found: nopeerror: process 0 failed (model directory "
               "not found: nope); stopping process 1")
    assert launch._wait([cause, victim], cause_grace=5.0) is cause


def test_bad_peer_timeout_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SPMD_LORA_PEER_TIMEOUT", "soon")
    with pytest.raises(Exception, match="SPMD_LORA_PEER_TIMEOUT='soon' must be a positive"):
        distributed.peer_timeout()


# ---- several processes ---------------------------------------------------------------------

def test_first_failure_is_propagated_with_rank_and_error_line(tmp_path):
    """Both processes fail (no such model): the launcher exits 2 with a rank and its error."""
    rc, out, err, _ = _run_launch(2, 1, ["train", "--model", str(tmp_path / "nope"), "--data",
                                         DATA, "--output", str(tmp_path / "o")], timeout=300)
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: process [01] \(pid \d+\) failed: exit status 2; its last error line:"
                    r" error: .*nope", last), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The 1-process oracle and the uninterrupted 2 x 4 launch of dp=2 x tp=4 (STEPS steps,
    a checkpoint every 2), shared by the tests below; records the launch's wall time."""
    root = tmp_path_factory.mktemp("runs")
    oracle = _oracle(tiny_model, root / "oracle", dp=2, tp=4, max_steps=STEPS, save_every=2)
    rc, out, err, wall = _run_launch(2, 4, _train_args(tiny_model, root / "two", dp=2, tp=4,
                                                       max_steps=STEPS, save_every=2))
    assert rc == 0, err
    return {"oracle": oracle, "two": root / "two", "out": out, "err": err, "wall": wall}


def test_two_processes_dp_across_processes_equal_one_process(runs):
    """2 processes x 4 devices, dp=2 across the processes, tp=4 within each."""
    _assert_close_runs(runs["two"], runs["oracle"])
    print(f"2-process dp=2 x tp=4 launch, {STEPS} steps: {runs['wall']:.1f} s wall")
    # process 0 alone prints the result and the progress; both processes ran
    results = [l for l in runs["out"].splitlines() if '"step"' in l]
    assert len(results) == 1 and results[0].startswith('[rank 0] {"step": 24')
    assert "[rank 1]" in runs["err"] and "[rank 0] step 24/24" in runs["err"]
    # Gloo's per-communicator notes are folded into one line per process
    assert "[Gloo]" not in runs["err"], runs["err"]
    for rank in (0, 1):
        assert runs["err"].count(f"[rank {rank}] gloo: connected to its peers") == 1, runs["err"]


def test_cp_ring_spanning_two_processes_equals_one_process(tiny_model, tmp_path):
    """2 processes x 2 devices, cp=2 x tp=2: ring attention's K/V permutes cross the
    processes (one cp rank per process)."""
    oracle = _oracle(tiny_model, tmp_path / "oracle", cp=2, tp=2, max_steps=3)
    rc, _, err, wall = _run_launch(2, 2, _train_args(tiny_model, tmp_path / "two", cp=2, tp=2,
                                                     max_steps=3))
    assert rc == 0, err
    _assert_close_runs(tmp_path / "two", oracle)
    print(f"2-process cp=2 x tp=2 launch, 3 steps: {wall:.1f} s wall")


def test_tp_group_spanning_two_processes_equals_one_process(tiny_model, tmp_path):
    """2 processes x 2 devices, dp=1 x tp=4: every tp all-reduce crosses the processes."""
    oracle = _oracle(tiny_model, tmp_path / "oracle", tp=4, max_steps=4)
    rc, _, err, wall = _run_launch(2, 2, _train_args(tiny_model, tmp_path / "two", tp=4,
                                                     max_steps=4))
    assert rc == 0, err
    print(f"2-process dp=1 x tp=4 launch, 4 steps: {wall:.1f} s wall")
    _assert_close_runs(tmp_path / "two", oracle)


def test_sigkill_of_a_process_stops_the_launch_and_resume_finishes(runs, tiny_model, tmp_path):
    """SIGKILL rank 1 after the first checkpoint: the launcher exits non-zero naming rank 1,
    no process is left; --resume on 2 processes then gives the uninterrupted 2-process adapter
    bit for bit, and resuming on 1 process (same mesh) matches too."""
    out = tmp_path / "cut"
    args = _train_args(tiny_model, out, dp=2, tp=4, max_steps=STEPS, save_every=2)
    proc = _launch(2, 4, args)
    err_lines = []
    deadline = time.time() + 300
    while len(_pids(err_lines)) < 2:
        err_lines.append(proc.stderr.readline())
    pids = _pids(err_lines)
    while not (out / "checkpoints" / "step_2").exists() and time.time() < deadline:
        assert proc.poll() is None, "".join(err_lines) + proc.stderr.read()
        time.sleep(0.01)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.perf_counter()
    rest = proc.communicate(timeout=120)[1]
    stopped = time.perf_counter() - t0
    assert not (out / "adapter").exists(), "killed too late to test resume"
    assert proc.returncode == 128 + signal.SIGKILL
    assert re.search(r"error: process 1 \(pid \d+\) failed: killed by SIGKILL; it printed no "
                     r"error line", rest), rest
    assert stopped < 120 and not any(_alive(p) for p in pids.values())
    print(f"launcher stopped {stopped:.1f} s after the SIGKILL")

    cross = tmp_path / "cross"                 # the same checkpoint, resumed on 1 process
    shutil.copytree(out, cross)
    rc, _, err, wall = _run_launch(2, 4, args + ["--resume"])
    assert rc == 0, err
    assert "resumed at step" in err
    print(f"2-process resume: {wall:.1f} s wall")
    a, b = _adapter(out), _adapter(runs["two"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)          # bit for bit
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))

    _oracle(tiny_model, cross, dp=2, tp=4, max_steps=STEPS, save_every=2, resume=True)
    _assert_close_runs(cross, runs["oracle"])


def _start_by_hand(args, nprocs, per, cwd=None, peer_timeout=None):
    """The processes without the launcher, with the environment variables it sets (what a
    SLURM or mpirun script sets by hand)."""
    envs = launch.child_envs(nprocs, per, launch._free_port(), peer_timeout)
    return [subprocess.Popen([sys.executable, "-m", "spmd_lora", *args], env=env,
                             cwd=None if cwd is None else cwd[rank], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for rank, env in enumerate(envs)]


def test_survivor_of_a_dead_peer_exits_with_an_error(tiny_model, tmp_path):
    """Without the launcher: SIGKILL process 1 mid-run; process 0, stuck in a collective,
    is stopped by its watchdog with `error: process 1 stopped responding`."""
    out = tmp_path / "run"
    procs = _start_by_hand(_train_args(tiny_model, out, dp=2, tp=1, max_steps=100000,
                                       log_every=1), 2, 1, peer_timeout=10)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs[1].kill()
    t0 = time.perf_counter()
    _, err = procs[0].communicate(timeout=120)
    waited = time.perf_counter() - t0
    procs[1].communicate()
    assert procs[0].returncode == distributed.EXIT_PEER_LOST, err
    assert re.search(r"^error: process 1 stopped responding .*stopping process 0$", err, re.M), err
    assert waited < 120
    print(f"survivor exited {waited:.1f} s after its peer's SIGKILL (peer timeout 10 s)")


def test_sigterm_to_the_launcher_leaves_no_orphans(tiny_model, tmp_path):
    proc = _launch(2, 1, _train_args(tiny_model, tmp_path / "run", dp=2, tp=1, max_steps=100000))
    lines = []
    deadline = time.time() + 300
    while not any("[rank 0] training" in l for l in lines):      # both are in jax by then
        line = proc.stderr.readline()
        assert line and time.time() < deadline, "".join(lines)
        lines.append(line)
    pids = _pids(lines)
    assert len(pids) == 2 and all(_alive(p) for p in pids.values())
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "error: launch stopped by SIGTERM; stopped all 2 processes" in rest
    assert not any(_alive(p) for p in pids.values())


def test_resume_refused_when_a_process_cannot_see_the_checkpoint(runs, tiny_model, tmp_path):
    """Node-local output dirs: process 0 sees checkpoints, process 1 (another cwd) none. Both
    stop before training with the same one-line error and status 2."""
    here, there = tmp_path / "host0", tmp_path / "host1"
    shutil.copytree(runs["two"], here / "run")
    there.mkdir()
    args = _train_args(tiny_model, "run", dp=2, tp=1, max_steps=STEPS, save_every=2) + ["--resume"]
    procs = _start_by_hand(args, 2, 1, cwd=[here, there])
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 2, err
        assert re.search(r"^error: process 1 sees no checkpoint in run/checkpoints but process 0 "
                         rf"sees checkpoint step_{STEPS}; .*share", err, re.M), err
        assert "Traceback" not in err
    assert not (there / "run" / "adapter").exists()


def test_eval_and_generate_on_two_processes_equal_one_process(runs, tiny_model, capsys):
    """dp=2 x tp=2 over 2 processes x 2 devices vs this process: the same eval loss (of the
    trained adapter), the same greedy completions (of the random base model: no early EOS;
    the new tokens of both dp groups are gathered to process 0 for printing)."""
    adapter = str(runs["oracle"] / "adapter")
    evaluate = ["eval", "--model", str(tiny_model), "--adapter", adapter, "--data", DATA,
                "--template", "alpaca", "--max-seq-len", "256", "--batch-size", "4",
                "--dp", "2", "--tp", "2"]
    generate = ["generate", "--model", str(tiny_model), "--dp", "2", "--tp", "2",
                "--prompt", "Name a colour.", "--prompt", "Two plus two is",
                "--max-new-tokens", "8"]
    walls = []
    for command in (evaluate, generate):
        assert cli.main(command) == 0
        ref = capsys.readouterr().out.strip().splitlines()
        rc, out, err, wall = _run_launch(2, 2, command)
        assert rc == 0, err
        # gloo's C++ runtime writes connection notes to descriptor 1, which the processes
        # point at stderr (distributed._keep_stdout_for_results): stdout is ours alone
        got = [re.sub(r"^\[rank \d+\] ", "", l) for l in out.strip().splitlines()]
        assert got == ref, (got, ref)          # printed once, by process 0, and equal
        walls.append(f"2-process {command[0]}: {wall:.1f} s wall; {got}")
    with capsys.disabled():
        print("\n".join(walls))
