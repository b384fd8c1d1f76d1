"""One flag table for every command (issue 26): every flag of every parser explains itself, a
flag of a TrainConfig field has the field's help and choices wherever it appears, and the other
flags take theirs from one table. Plus the CPU run's note on its simulated devices and the
--allow-many-cpu-devices check, run in this process (no compile: each stops at the check or
at the first missing file)."""
import argparse
import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest

from spmd_lora import cli
from spmd_lora.cli import launch, plan
from spmd_lora.cli.parser import command_name
from spmd_lora.config.cli_flags import CLI_HELP, MANY_CPU_DEVICES
from spmd_lora.config.fields import CHOICES, FIELD_HELP, flag
from spmd_lora.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FIELD_OF_FLAG = {flag(f.name): f.name for f in dataclasses.fields(TrainConfig)}


def _profile_parser():
    spec = importlib.util.spec_from_file_location("tool_profile", ROOT / "tools" / "profile.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.build_parser()


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser: spmd-lora's subcommands, plan's and launch's own, the profile
    tool's."""
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    parsers = {name: p for name, p in sub.items() if name not in ("plan", "launch")}
    parsers.update(plan=plan.build_parser(), launch=launch.build_parser(),
                   profile=_profile_parser())
    return parsers


def _own_flags(action):
    """The actions a command defines itself (not -h, not the hidden old names)."""
    return not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS


def test_every_flag_of_every_command_takes_its_help_from_one_table():
    parsers = _parsers()
    assert set(parsers) == {"train", "demo", "eval", "generate", "export", "plot", "dashboard",
                            "rag-data", "plan", "launch", "profile"}
    used = set()
    for command, parser in parsers.items():
        assert command_name(parser) == command
        parser.format_help()                       # every %(default)s / %% expands
        for action in filter(_own_flags, parser._actions):
            where = f"{command} {action.option_strings or action.dest}"
            assert action.help and action.help.strip(), where
            assert action.help.count("default:") <= 1, where    # said once, by the text or us
            field = next((FIELD_OF_FLAG[o] for o in action.option_strings if o in FIELD_OF_FLAG),
                         None)
            if command == "launch":                # the launcher's flags stay beside it
                continue
            key = action.option_strings[0] if action.option_strings else action.dest
            own = CLI_HELP.get(f"{command} {key}")
            if field is not None:
                assert action.help.startswith(own or FIELD_HELP[field]), where
                assert tuple(action.choices or ()) == CHOICES.get(field, ()), where
            else:
                expected = own or CLI_HELP.get(key)
                assert expected is not None, f"{where}: not in cli_flags.CLI_HELP"
                assert action.help.startswith(expected), where
            used.add(f"{command} {key}" if own else key)
    assert used >= set(CLI_HELP), f"unused entries: {set(CLI_HELP) - used}"


def test_field_flags_keep_their_defaults_in_every_command():
    """eval / generate / export use the field defaults (generate's --template: the raw prompt);
    plan's --max-seq-len 4096 and the profile tool's GPU-run defaults are their own."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    parsers = _parsers()
    checked = 0
    for command in ("eval", "generate", "export"):
        for action in parsers[command]._actions:
            name = next((FIELD_OF_FLAG[o] for o in action.option_strings if o in FIELD_OF_FLAG),
                        None)
            if name is None or (command, name) == ("generate", "template"):
                continue
            required = fields[name] is dataclasses.MISSING
            assert action.default == (None if required else fields[name]), (command, name)
            checked += 1
    assert checked == 29          # eval 20 (5 of them the DPO settings), generate 7, export 2
    assert parsers["generate"].parse_args(["--model", "m", "--prompt", "p"]).template is None
    assert plan.build_parser().parse_args(["--model", "m"]).max_seq_len == 4096
    args = parsers["profile"].parse_args(["--model", "m", "--max-seq-len", "8"])
    assert (args.dtype, args.remat, args.targets) == ("bfloat16", "full", "all")


@pytest.mark.parametrize("argv,message", [
    (["plan", "--model", "llama2-7b", "--attention", "garbage"],
     "spmd-lora plan: argument --attention: invalid choice: 'garbage'"),
    (["eval", "--model", "m", "--data", "d", "--base-quant", "bogus"],
     "spmd-lora eval: argument --base-quant: invalid choice: 'bogus'"),
    (["generate", "--model", "m", "--prompt", "p", "--template", "alpacca"],
     "spmd-lora generate: argument --template: invalid choice: 'alpacca'"),
])
def test_choice_typos_in_any_command_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {message} (choose from ") and err.endswith(" --help)\n"), err


# --------------------------------------------------------------------------- simulated devices

def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: CPU run")]


def test_a_cpu_run_says_how_many_devices_it_simulates(tmp_path, capsys):
    rc = cli.main(["train", "--model", str(tmp_path / "no-model"), "--data", "d",
                   "--output-dir", str(tmp_path / "out"), "--tp", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "model directory not found" in err.splitlines()[-1], err
    assert _notes(err) == [f"note: CPU run: the mesh uses 2 simulated devices (tp=2) on "
                           f"{len(os.sched_getaffinity(0))} cores; a GPU run uses real ones"]
    assert cli.main(["train", "--model", "m", "--data", "d", "--output-dir", "o"]) == 2
    assert _notes(capsys.readouterr().err) == []                    # one device: nothing to say
    run = tmp_path / "run.yaml"                    # the mesh of a --config file, under the flags
    run.write_text("model: no-model\ndata: d\noutput_dir: out\ntp: 2\ndp: 2\nbatch_size: 2\n")
    assert cli.main(["train", "--config", str(run), "--dp", "4", "--batch-size", "4"]) == 2
    assert _notes(capsys.readouterr().err)[0].startswith(
        "note: CPU run: the mesh uses 8 simulated devices (tp=2 x dp=4) on ")


def test_many_cpu_devices_need_the_flag(tmp_path, capsys, monkeypatch):
    """tp*dp*cp above MANY_CPU_DEVICES: refused before the devices are made (XLA_FLAGS keeps
    8), unless --allow-many-cpu-devices; a device count the user set in XLA_FLAGS is theirs."""
    monkeypatch.delenv("XLA_FLAGS")             # as a user's shell: this process picks the count
    argv = ["train", "--model", str(tmp_path / "no-model"), "--data", "d", "--output-dir",
            str(tmp_path / "out"), "--tp", "4", "--dp", "8", "--batch-size", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: the mesh (tp=4 x dp=8) needs 32 devices, which a CPU run simulates "
                   f"on this machine's {len(os.sched_getaffinity(0))} cores (slow): pass "
                   f"--allow-many-cpu-devices to run more than {MANY_CPU_DEVICES} anyway, or "
                   f"run on GPUs\n")
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"

    monkeypatch.delenv("XLA_FLAGS")
    assert cli.main(argv + ["--allow-many-cpu-devices"]) == 2         # past the check
    err = capsys.readouterr().err
    assert "model directory not found" in err.splitlines()[-1], err
    assert _notes(err)[0].startswith("note: CPU run: the mesh uses 32 simulated devices "
                                     "(tp=4 x dp=8) on ")
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=32"

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
    assert cli.main(argv) == 2                                        # the user's count
    assert "model directory not found" in capsys.readouterr().err.splitlines()[-1]
