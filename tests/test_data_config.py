"""Run config files (`train --config`), output_dir/config.yaml, and the resume config check."""
import json

import pytest
import yaml

from spmd_lora import cli
from spmd_lora.tiny import asset_path, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1)


def _flags(model, out, data=None):
    return ["--model", str(model), "--data", str(data or asset_path("alpaca_sample.jsonl")),
            "--output-dir", str(out), "--template", "alpaca", "--max-seq-len", "192",
            "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,down_proj", "--batch-size", "2",
            "--max-steps", "2", "--learning-rate", "0.01", "--seed", "3", "--tp", "2"]


def _train(capsys, *args):
    rc = cli.main(["train", *args])
    return rc, capsys.readouterr().err


def test_yaml_config_run_equals_flags_run_and_resume_checks(tiny_model, tmp_path, capsys):
    by_flags = tmp_path / "flags"
    rc, err = _train(capsys, *_flags(tiny_model, by_flags))
    assert rc == 0, err

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_model), "data": str(asset_path("alpaca_sample.jsonl")),
        "template": "alpaca", "max-seq-len": 192, "lora_rank": 4,
        "lora_targets": ["q_proj", "v_proj", "down_proj"], "batch_size": 2, "max_steps": 50,
        "learning_rate": 0.01, "seed": 3, "tp": 2}))
    by_file = tmp_path / "file"
    rc, err = _train(capsys, "--config", str(cfg), "--output", str(by_file), "--max-steps", "2")
    assert rc == 0, err
    adapter = "adapter/adapter_model.safetensors"
    assert (by_file / adapter).read_bytes() == (by_flags / adapter).read_bytes()
    resolved = yaml.safe_load((by_file / "config.yaml").read_text())
    assert resolved == {**yaml.safe_load((by_flags / "config.yaml").read_text()),
                        "output_dir": str(by_file)}
    assert resolved["max_steps"] == 2 and resolved["lora_targets"] == ["q_proj", "v_proj",
                                                                       "down_proj"]

    # --resume with a result-changing field changed is refused, naming the field ...
    rc, err = _train(capsys, *_flags(tiny_model, by_flags), "--resume", "--learning-rate", "0.5")
    assert rc == 2 and "cannot resume: '--learning-rate' is 0.5" in err, err
    # ... so is other data content at another path; execution-only fields may change.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line.replace("a", "e") + "\n" for line in
                             asset_path("alpaca_sample.jsonl").read_text().splitlines()))
    rc, err = _train(capsys, *_flags(tiny_model, by_flags, data=other), "--resume")
    assert rc == 2 and "differs in content from the data the checkpoint" in err, err
    same = tmp_path / "same.jsonl"
    same.write_bytes(asset_path("alpaca_sample.jsonl").read_bytes())
    rc, err = _train(capsys, *_flags(tiny_model, by_flags, data=same), "--resume",
                     "--log-every", "5", "--save-every", "7")
    assert rc == 0, err
    assert (by_flags / adapter).read_bytes() == (by_file / adapter).read_bytes()


@pytest.mark.parametrize("text,name,msg", [
    ("lora_rnak: 4\n", "run.yaml", "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
    ("lora_rank: four\n", "run.yaml", "'lora_rank' must be an integer, got 'four'"),
    ("pack: 1\n", "run.yaml", "'pack' must be true or false"),
    ("lora_targets: [1, 2]\n", "run.yaml", "'lora_targets' must be a list of strings"),
    ("seed: [3\n", "run.yaml", "malformed YAML"),
    ('{"seed": 3,}', "run.json", "run.json, line 1: malformed JSON"),
    ("- 1\n- 2\n", "run.yaml", "a config file must be a mapping"),
    ("template: alpaca\n", "run.yaml", "--model is required (or set model: in the --config"),
    (None, "missing.yaml", "config file not found"),
])
def test_bad_config_files_are_clear_errors(tmp_path, capsys, text, name, msg):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    rc, err = _train(capsys, "--config", str(path), "--output", str(tmp_path / "o"))
    assert rc == 2 and "Traceback" not in err and msg in err, err
    assert not (tmp_path / "o").exists()


def test_json_config_keys_may_be_kebab_case(tmp_path):
    from spmd_lora.config.files import read_config_file
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"model": "m", "lora-alpha": 4, "max_steps": None}))
    assert read_config_file(p) == {"model": "m", "lora_alpha": 4.0, "max_steps": None}
