"""Every output path is checked before work starts (issue 26): an output that cannot be created
or written is one ``error:`` line naming the flag, the path and the reason, exit status 2, and
nothing is created; the tiny model directory appears whole or not at all. The unwritable paths
fail for root too: a path under a regular file, and one under /proc."""
import errno
from pathlib import Path

import pytest

from spmd_lora import cli
from spmd_lora import tiny
from spmd_lora.cli import commands
from spmd_lora.errors import ConfigError
from spmd_lora.paths import check_writable_dir, ensure_writable_dir, write_text_atomic
from spmd_lora.tiny import build_tiny_llama

from test_cli_errors import _one_error_line, _train_args

PROC = Path("/proc/spmd_lora_test/out")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1)


@pytest.fixture()
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("a regular file, not a directory")
    return f


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_train_output_dir_that_cannot_be_created(tiny_model, tmp_path, afile, capsys, where):
    out = afile / "out" if where == "under_a_file" else PROC
    before = _listing(tmp_path)
    rc = cli.main(_train_args(tiny_model, out, "--max-steps", "1"))
    line = _one_error_line(capsys.readouterr().err)
    reason = "Not a directory" if where == "under_a_file" else "No such file or directory"
    assert rc == 2 and line == f"error: --output-dir {out}: cannot create the directory: {reason}"
    assert _listing(tmp_path) == before


def test_train_probe_leaves_nothing_when_a_later_check_fails(tiny_model, tmp_path, capsys):
    """The output directory passes the probe, the data does not: the probe created
    out/deeper for nothing and removed it again."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": 3, "output": "b"}\n')
    rc = cli.main(["train", "--model", str(tiny_model), "--data", str(bad), "--output-dir",
                   str(tmp_path / "out" / "deeper"), "--template", "alpaca"])
    assert rc == 2 and "must be a string" in _one_error_line(capsys.readouterr().err)
    assert _listing(tmp_path) == ["bad.jsonl"]


def test_cache_dir_that_cannot_be_written(tiny_model, tmp_path, afile, capsys, monkeypatch):
    monkeypatch.setenv("SPMD_LORA_CACHE", str(afile / "cache"))
    rc = cli.main(_train_args(tiny_model, tmp_path / "out", "--max-steps", "1"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"error: tokenized-data cache directory {afile / 'cache'}: cannot "
                                f"create the directory: Not a directory; set --data-cache-dir or "
                                f"$SPMD_LORA_CACHE to a writable directory")
    assert _listing(tmp_path) == ["afile"]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_export_output_that_cannot_be_created(tmp_path, afile, capsys, where):
    """Refused before the model or adapter is read (neither exists here)."""
    out = afile / "merged" if where == "under_a_file" else PROC
    rc = cli.main(["export", "--model", str(tmp_path / "model"), "--adapter",
                   str(tmp_path / "adapter"), "--output", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    reason = "Not a directory" if where == "under_a_file" else "No such file or directory"
    assert rc == 2 and line == f"error: export --output {out}: cannot create the directory: {reason}"
    assert _listing(tmp_path) == ["afile"]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_demo_output_that_cannot_be_created(tmp_path, afile, capsys, where):
    out = afile / "demo" if where == "under_a_file" else PROC
    rc = cli.main(["demo", "--output", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    reason = "Not a directory" if where == "under_a_file" else "No such file or directory"
    assert rc == 2 and line == f"error: --output {out}: cannot create the directory: {reason}"
    assert _listing(tmp_path) == ["afile"]


def test_demo_refuses_a_partial_tiny_llama(tmp_path, capsys):
    """An interrupted build of an older version left tiny_llama/ without config.json: the demo
    says so instead of training on it or deleting it."""
    partial = tmp_path / "demo" / "tiny_llama"
    partial.mkdir(parents=True)
    (partial / "tokenizer.json").write_text("{}")
    rc = cli.main(["demo", "--output", str(tmp_path / "demo")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{partial} is not a complete tiny model (no config.json)" in line
    assert _listing(tmp_path) == ["demo", "demo/tiny_llama", "demo/tiny_llama/tokenizer.json"]


def test_plot_output_that_cannot_be_created(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    rc = cli.main(["plot", str(run), "--output", str(PROC / "loss.png")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"error: --output's directory {PROC}: cannot create the "
                                f"directory: No such file or directory")
    assert _listing(tmp_path) == ["run", "run/metrics.jsonl"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_tiny_llama_build_leaves_nothing(tmp_path, monkeypatch, failure):
    """Everything but the weights is written when the weights fail: nothing of it stays at the
    target (a demo would otherwise trust its config.json), nor any temporary directory."""
    def fail(*args, **kwargs):
        raise failure(errno.ENOSPC, "No space left on device") if failure is OSError else failure()

    monkeypatch.setattr(tiny, "write_safetensors_checkpoint", fail)
    with pytest.raises(failure):
        build_tiny_llama(tmp_path / "tiny", with_tokenizer=False)
    assert _listing(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(failure):
        build_tiny_llama(empty, with_tokenizer=False)
    assert _listing(tmp_path) == ["empty"]                 # an existing empty target stays as is
    (empty / "mine.txt").write_text("user data")
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        build_tiny_llama(empty, with_tokenizer=False)


def test_probe_functions(tmp_path, afile):
    deep = tmp_path / "a" / "b"
    assert check_writable_dir(deep, "x") == deep and not (tmp_path / "a").exists()
    assert ensure_writable_dir(deep, "x") == deep and deep.is_dir()
    assert _listing(tmp_path) == ["a", "a/b", "afile"]        # the probe file is gone
    with pytest.raises(ConfigError, match=f"^--flag {afile} exists and is not a directory$"):
        ensure_writable_dir(afile, "--flag")
    with pytest.raises(ConfigError, match=r"^--flag /proc: cannot write in the directory: .+; hint$"):
        check_writable_dir("/proc", "--flag", hint="hint")
    target = tmp_path / "t.txt"
    write_text_atomic(target, "old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "new \ud800")                 # fails while writing
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["a", "afile", "t.txt"]


def test_os_errors_naming_a_file_are_one_line_bugs_stay_tracebacks(afile, capsys):
    """The backstop in _guard / _guard_multi: an OSError that names a path is the user's (one
    line, status 2); one without a path is a bug and propagates."""
    path = afile / "x"
    assert commands._guard(lambda: open(path, "w")) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {path}: Not a directory"
    assert commands._guard_multi(lambda: open(path, "w")) == (2, f"{path}: Not a directory")
    capsys.readouterr()

    def bug():
        raise OSError(errno.EINVAL, "Invalid argument")

    with pytest.raises(OSError, match="Invalid argument"):
        commands._guard(bug)
    status, line = commands._guard_multi(bug)
    assert (status, line) == (1, "OSError: [Errno 22] Invalid argument")
    assert "Traceback" in capsys.readouterr().err
