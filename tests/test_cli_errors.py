"""The rough edges a new user hit (issue 15), each run through the CLI as the user ran it:
exit code, the one ``error:`` line, and that nothing was written. Plus the flag/API contract:
every TrainConfig field has help text, choice-valued flags list their choices, plan / profile /
bench use train's flag names, messages name flags."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_lora import cli
from spmd_lora import data
from spmd_lora.cli import plan
from spmd_lora.errors import ConfigError, TrainingError
from spmd_lora.health import DivergenceGuard
from spmd_lora.tiny import asset_path, build_tiny_llama
from spmd_lora.train import TrainConfig
from spmd_lora.config.fields import CHOICES, FIELD_HELP, with_flag_names

ROOT = Path(__file__).resolve().parents[1]
ALPACA = str(asset_path("alpaca_sample.jsonl"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1)


def _one_error_line(err: str, progress: bool = False) -> str:
    """The single ``error:`` line of stderr (the last line; with ``progress``, training's
    progress lines may come before it). A data ``warning:`` or the CPU run's ``note:`` on its
    simulated devices may come before it."""
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("warning: ", "note: "))]
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, err
    assert progress or len(lines) == 1, err
    return lines[-1]


def _train_args(model, out, *extra):
    return ["train", "--model", str(model), "--data", ALPACA, "--output-dir", str(out),
            "--template", "alpaca", "--max-seq-len", "128", "--lora-rank", "4", *extra]


def _run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "spmd_lora", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


# 1 --------------------------------------------------------------------------- truncated weights

def test_truncated_safetensors_is_one_error_line_in_train_eval_export(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    shard = sorted(model.glob("*.safetensors"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    runs = {
        "train": _train_args(model, tmp_path / "out", "--max-steps", "1"),
        "eval": ["eval", "--model", str(model), "--data", ALPACA, "--template", "alpaca",
                 "--max-seq-len", "128"],
        "export": ["export", "--model", str(model), "--adapter", str(tmp_path / "adapter"),
                   "--output", str(tmp_path / "merged")],
    }
    (tmp_path / "adapter").mkdir()                          # export needs a valid adapter first
    from spmd_lora.config.lora_config import LoraConfig
    from spmd_lora.weights.lora import init_lora
    from spmd_lora.config.model_config import ModelConfig
    from spmd_lora.weights.peft import save_adapter
    import jax
    lcfg = LoraConfig(rank=2, targets=("q_proj",))
    save_adapter(tmp_path / "adapter", init_lora(ModelConfig.from_pretrained(model), lcfg,
                                                  jax.random.key(0)), lcfg)
    for name, argv in runs.items():
        rc = cli.main(argv)
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 2, name
        assert f"{shard} is truncated: {size // 2} bytes" in line and "again" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


# 2 --------------------------------------------------------------------------- choice typos

def test_attention_typo_is_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    p = _run_cli(*_train_args(tmp_path / "no-model", out, "--attention", "flash"))
    line = _one_error_line(p.stderr)
    assert p.returncode == 2 and p.stdout == ""
    assert "--attention: invalid choice: 'flash'" in line and "'blockwise'" in line
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["plan", "--model", "llama2-7b", "--dtype", "fp8"], "spmd-lora plan: argument --dtype: invalid choice: 'fp8'"),
    (["eval", "--model", "m", "--data", "d", "--template", "alpacca"], "argument --template: invalid choice"),
    (["generate", "--model", "m", "--prompt", "p", "--dtype", "f32"], "argument --dtype: invalid choice"),
])
def test_usage_mistakes_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_missing_required_train_flags_are_one_line(capsys):
    """--model / --data / --output-dir may also come from a --config file, so they are checked
    after it; each message names the flag and the file's key the same way."""
    for argv, name in ((["--data", "d", "--output-dir", "o"], "model"),
                       (["--model", "m", "--output-dir", "o"], "data"),
                       (["--model", "m", "--data", "d"], "output_dir")):
        assert cli.main(["train", *argv]) == 2
        assert _one_error_line(capsys.readouterr().err) == (
            f"error: --{name.replace('_', '-')} is required (or set {name}: in the --config "
            f"file)")


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_every_choice_field_is_checked_by_the_api_too(field):
    with pytest.raises(ConfigError, match=rf"{field} 'bogus' unknown; choose from "):
        TrainConfig(model="m", data="d", output_dir="o", **{field: "bogus"})


# 3 --------------------------------------------------------------------------- resume without checkpoint

def test_resume_without_checkpoint_says_so(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(_train_args(tiny, out, "--max-steps", "1", "--resume"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"no checkpoint in {out / 'checkpoints'}; starting from step 0" in err


# 4 --------------------------------------------------------------------------- one-object .json

def test_json_file_with_one_object_is_refused(tiny, tmp_path, capsys):
    bad = tmp_path / "one.json"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}))
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", str(tiny), "--data", str(bad), "--output-dir", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{bad}: a .json file must hold a JSON list of records" in line
    assert not out.exists()
    # the same single line as JSONL is one valid record
    ok = tmp_path / "one.jsonl"
    ok.write_text(bad.read_text() + "\n")
    assert len(data.load_records(ok)) == 1


# 5 --------------------------------------------------------------------------- runaway learning rate

def test_absurd_learning_rate_stops_with_a_training_error(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(_train_args(tiny, out, "--learning-rate", "1e30", "--max-steps", "5",
                              "--lora-targets", "all"))
    line = _one_error_line(capsys.readouterr().err, progress=True)
    assert rc == 2
    assert re.search(r"error: (LoRA factors blew up at step 1 \(norm (inf|nan|[\d.e+]+)|loss became)", line), line
    assert "lower --learning-rate" in line
    assert not (out / "adapter").exists()
    assert not (out / "metrics.jsonl").exists()        # stopped at step 1: no empty file


def test_divergence_guard_zero_gradients_and_norms():
    guard = DivergenceGuard(max_lora_norm=1e6, zero_grad_steps=3)
    last = lambda: "none"                                        # noqa: E731
    guard.check(1, 6.2, 0.0, 10.0, last)
    guard.check(2, 6.2, 0.0, 10.0, last)
    guard.check(3, 6.2, 0.5, 10.0, last)                      # a non-zero gradient resets the count
    guard.check(4, 6.2, 0.0, 10.0, last)
    guard.check(5, 6.2, 0.0, 10.0, last)
    with pytest.raises(TrainingError, match="exactly zero for 3 steps.*stuck at 6.2000"):
        guard.check(6, 6.2, 0.0, 10.0, last)
    with pytest.raises(TrainingError, match="blew up at step 2"):
        DivergenceGuard().check(2, 6.2, 1.0, 3e30, last)
    with pytest.raises(TrainingError, match="loss became nan"):
        DivergenceGuard().check(2, float("nan"), 1.0, 1.0, last)


# 6 --------------------------------------------------------------------------- help and flag names

def test_help_is_plain_and_every_train_flag_explains_itself():
    top = cli.build_parser().format_help()
    assert "``" not in top and "dashboard" in top and "plot" in top
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    train_help = sub["train"].format_help()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        action = next(a for a in sub["train"]._actions if flag in a.option_strings)
        assert action.help and action.help.startswith(FIELD_HELP[field.name][:20]), flag
    for field, values in CHOICES.items():
        assert "{" + ",".join(values) + "}" in train_help, field
    for name in ("eval", "generate"):
        assert "{float32,bfloat16,float16}" in sub[name].format_help()


def test_field_table_matches_the_api():
    """The help table, TrainConfig and the modules that own each choice cannot drift."""
    from spmd_lora.kernels.registry import IMPLS
    from spmd_lora.model import REMAT_POLICIES
    from spmd_lora.weights.shapes import DTYPES
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(CHOICES["attention"]) == set(IMPLS)
    assert set(CHOICES["remat"]) == {*REMAT_POLICIES, "auto"}    # auto: resolved before the step
    assert set(CHOICES["dtype"]) == set(DTYPES)
    assert set(CHOICES["template"]) == set(data.TEMPLATES) | {"auto"}


def test_messages_name_the_flags_the_user_typed(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", "m", "--data", "d", "--output-dir", str(out),
                   "--lora-rank", "0"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == "error: --lora-rank must be >= 1, got 0"
    assert with_flag_names("pass resume=True (--resume) or choose a new output_dir") == \
        "pass --resume or choose a new --output-dir"
    assert not out.exists()


def test_plan_profile_bench_use_train_flag_names_and_keep_old_ones_hidden():
    import importlib.util
    new = ["--model", "x", "--lora-targets", "q_proj", "--batch-size", "2", "--grad-accum-steps", "3"]
    old = ["--model", "x", "--targets", "q_proj", "--batch", "2", "--micro-batches", "3"]
    tools = {}
    for name in ("profile", "bench"):
        spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
        tools[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tools[name])
    for parser in (plan.build_parser(), tools["profile"].build_parser()):
        a, b = parser.parse_args(new + ["--max-seq-len", "8"]), parser.parse_args(old + ["--max-seq-len", "8"])
        assert (a.targets, a.batch, a.micro_batches) == (b.targets, b.batch, b.micro_batches) == ("q_proj", 2, 3)
        text = parser.format_help()
        assert "--lora-targets" in text and "--micro-batches" not in text and "--targets " not in text
    bench = tools["bench"].build_parser()
    a = bench.parse_args(["--lora-targets", "q_proj", "--lora-rank", "4", "--batch-size", "2"])
    b = bench.parse_args(["--targets", "q_proj", "--rank", "4", "--batch", "2"])
    assert (a.targets, a.rank, a.batch) == (b.targets, b.rank, b.batch) == ("q_proj", 4, 2)
    assert "--rank " not in bench.format_help()


# 7 --------------------------------------------------------------------------- plan defaults, XLA_FLAGS

def test_plan_uses_and_prints_train_defaults(tmp_path, capsys):
    args = plan.build_parser().parse_args(["--model", "x"])
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert (args.dtype, args.remat, args.lora_rank, args.targets, args.batch, args.micro_batches) == \
        (d["dtype"], d["remat"], d["lora_rank"], ",".join(d["lora_targets"]), d["batch_size"],
         d["grad_accum_steps"])
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(plan_tiny_config()))
    assert plan.main(["--model", str(model), "--tp", "2", "--max-seq-len", "32",
                      "--attention", "xla"]) == 0
    text = capsys.readouterr().out
    assert ("settings (spmd-lora train's defaults unless given): --dtype float32 --remat none "
            "--lora-rank 16 --lora-targets q_proj,v_proj --batch-size 1 --grad-accum-steps 1") in text


def plan_tiny_config():
    from spmd_lora.config.model_config import ModelConfig
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8).to_hf_dict()


def test_raising_a_users_xla_device_count_is_said_on_stderr():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    p = subprocess.run([sys.executable, "-c", "from spmd_lora.analysis import plan; "
                        "plan.ensure_host_devices(4); import os; print(os.environ['XLA_FLAGS'])"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "note: XLA_FLAGS asks for 2 host devices; using 4" in p.stderr
    assert p.stdout.strip() == "--xla_force_host_platform_device_count=4"


# 8 --------------------------------------------------------------------------- README and docs

def test_readme_points_into_the_repo_and_its_snippet_is_honest():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert "docs/architecture.md" in readme and (ROOT / "docs" / "architecture.md").is_file()
    assert re.search(r"takes about \d+ minutes", readme)             # test suite duration
    snippet = readme[readme.index("from peft import PeftModel"):]
    snippet = snippet[:snippet.index("```")]
    for name in re.findall(r"import ([\w, ]+)", snippet)[0:]:
        for imported in (n.strip() for n in name.split(",")):
            assert snippet.count(imported) >= 2, f"README imports {imported} and never uses it"
    assert "allclose" in snippet                                    # how to check logits match
    assert "what you should see" in readme.lower()


def test_nothing_in_the_repo_points_outside_it():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for f in files:
        path = ROOT / f
        if path.suffix in (".py", ".md", ".toml", ".txt", ".js", ".html") and path.is_file() \
                and path != Path(__file__).resolve():
            assert "../shared/" not in path.read_text(errors="replace"), f


# 9 --------------------------------------------------------------------------- demo directory

def test_demo_output_is_git_ignored_and_never_silently_replaced(tmp_path, capsys):
    p = subprocess.run(["git", "check-ignore", "-q", "spmd_lora_demo/run/metrics.jsonl"], cwd=ROOT)
    assert p.returncode == 0, "spmd_lora_demo/ is not git-ignored"
    run = tmp_path / "demo" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = sorted(x.name for x in (tmp_path / "demo").rglob("*"))
    rc = cli.main(["demo", "--output", str(tmp_path / "demo")])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{run} holds a previous demo run: pass --resume" in line
    assert "--overwrite" in line
    assert sorted(x.name for x in (tmp_path / "demo").rglob("*")) == before


def test_report_to_tensorboard_without_tensorboardx_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    out = tmp_path / "out"
    rc = cli.main(_train_args(tiny, out, "--report-to", "tensorboard"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--report-to tensorboard needs tensorboardX" in line
    assert not out.exists()


@pytest.mark.parametrize("flags,text", [
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--learning-rate", "-1e-3"], "--learning-rate must be > 0, got -0.001"),
    (["--eval-every", "-5"], "--eval-every must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (0 = no clipping), got -1"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1], got 2"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--attention", "cudnn"], "attention 'cudnn' needs a CUDA GPU, but this run's devices are cpu"),
])
def test_value_ranges_and_negative_numbers(tiny, tmp_path, capsys, flags, text):
    """Out-of-range values are refused before anything is written; a negative number (also
    with an exponent) is read as the flag's value, not as another flag."""
    rc = cli.main(_train_args(tiny, tmp_path / "out", *flags))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and text in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_dashboard_port_out_of_range(capsys, port):
    rc = cli.main(["dashboard", "--port", port])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--port must be in 1..65535" in line, line


def test_unsupported_data_format_and_config_mode(tiny, tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    csv.write_text("instruction,output\na,b\n")
    rc = cli.main(["train", "--model", str(tiny), "--data", str(csv), "--output-dir",
                   str(tmp_path / "out"), "--template", "alpaca"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and ".csv files are not a supported data format" in line, line
    from spmd_lora.config.files import write_resolved_config
    old = os.umask(0o022)
    try:
        path = write_resolved_config(tmp_path, TrainConfig(model="m", data="d", output_dir="o"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_data_warning_is_one_plain_line(tiny, tmp_path):
    r = _run_cli(*_train_args(tiny, tmp_path / "out", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "skipped" in x and "max_seq_len" in x]
    assert lines and lines[0].startswith("warning: skipped"), r.stderr
    assert "DataWarning" not in r.stderr and ".py:" not in r.stderr, r.stderr


def test_dashboard_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "metrics.jsonl"
    f.write_text("{}\n")
    rc = cli.main(["dashboard", str(f), "--port", "0"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "is a file, not a run directory" in line, line


def test_plan_gpu_only_attention_without_target_is_one_line(capsys):
    """--attention cudnn (a CUDA-only kernel) planned on this CPU machine without --target."""
    assert cli.main(["plan", "--model", "llama3-8b", "--attention", "cudnn", "--max-seq-len",
                     "4096"]) == 2
    assert "--attention cudnn runs on CUDA GPUs only" in _one_error_line(capsys.readouterr().err)
