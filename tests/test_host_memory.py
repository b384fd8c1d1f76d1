"""Host memory as a budget (issue 25): what the offload policies keep on the host, the check
``spmd-lora train`` makes before compiling, and remat ``auto`` (the cheapest policy that fits),
against a brute-force search over every policy's compiled plan."""
import subprocess
import sys

import pytest

from spmd_lora import cli
from spmd_lora.analysis import budgets, plan
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.config.model_config import PRESETS, ModelConfig
from spmd_lora.config.sizes import GiB, parse_size
from spmd_lora.errors import ConfigError
from spmd_lora.tiny import asset_path, build_tiny_llama
from spmd_lora.train import TrainConfig

ALPACA = str(asset_path("alpaca_sample.jsonl"))


def test_offloaded_bytes_by_hand():
    cfg = PRESETS["llama3-8b"]                     # 32 layers, hidden 4096
    s, tp = 1 << 20, 8
    kw = dict(max_seq_len=s, batch=1, dtype="bfloat16", sequence_parallel=True)
    one = (s // tp) * 4096 * 2                      # one [S/tp, D] bf16 value per device
    assert budgets.offloaded_bytes(cfg, tp, 1, remat="offload", **kw) == 2 * 32 * one
    assert budgets.offloaded_bytes(cfg, tp, 1, remat="offload-input", **kw) == 32 * one
    assert budgets.offloaded_bytes(cfg, tp, 1, remat="offload-input", offload_layers=8,
                                   **kw) == 8 * one
    assert budgets.offload_split(cfg, "offload", 8) == (2 * 8, 2 * 24)   # host, device
    assert budgets.offloaded_bytes(cfg, tp, 1, remat="full", **kw) == 0
    # 512 KiB per token for llama3-8b under offload, over the devices (the figure)
    assert budgets.offloaded_bytes(cfg, 1, 1, remat="offload", max_seq_len=1, batch=1,
                                   dtype="bfloat16", sequence_parallel=False) == 512 * 1024


def test_host_budget_check_names_the_short_budget():
    ram = {"total": 16 * GiB, "available": 8 * GiB}
    ok = budgets.check_host_budget(GiB, remat="offload", devices_per_process=2, processes=2,
                                   ram=ram)
    assert ok == {"need": 4 * GiB, "budget": 8 * GiB, "budget_from": "this machine's available RAM"}
    with pytest.raises(ConfigError, match=r"--host-memory is 3.00 GiB: short by 1.00 GiB"):
        budgets.check_host_budget(GiB, remat="offload", devices_per_process=2, processes=2,
                                  host_memory=3 * GiB, ram=ram)
    with pytest.raises(ConfigError, match=r"available RAM is 8.00 GiB: short by 2.00 GiB.*"
                                          r"--offload-layers"):
        budgets.check_host_budget(GiB, remat="offload-input", devices_per_process=2,
                                  processes=5, host_memory=64 * GiB, ram=ram)


def test_local_processes_from_the_environment(monkeypatch):
    for name in ("SPMD_LORA_LOCAL_PROCESSES", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert budgets.local_processes() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert budgets.local_processes() == 4
    monkeypatch.setenv("SPMD_LORA_LOCAL_PROCESSES", "8")
    assert budgets.local_processes() == 8


def test_sizes_and_config_fields():
    assert parse_size("1.9TB") == int(1.9 * 1024 ** 4) and parse_size("512GiB") == 512 * GiB
    with pytest.raises(ConfigError, match="host_memory is not a size"):
        TrainConfig(model="m", data="d", output_dir="o", host_memory="lots")
    with pytest.raises(ConfigError, match="offload_layers applies to remat offload"):
        TrainConfig(model="m", data="d", output_dir="o", remat="full", offload_layers=2)
    assert TrainConfig(model="m", data="d", output_dir="o", host_memory="2GB").host_memory_bytes \
        == 2 * GiB


# ----------------------------------------------------------------------------- remat auto

def _fake_plan_at(calls):
    """A model of 4 layers; one saved value is 10 bytes per device and layer; device peaks:
    none 200, save-dots 150, full 120, offload 60 + 20 per layer kept on the device,
    offload-input 55 + 10 per layer kept."""
    base = {"none": 200, "save-dots": 150, "full": 120}

    def plan_at(remat, k=None):
        calls.append((remat, k))
        names = {"offload": 2, "offload-input": 1}.get(remat, 0)
        kk = 4 if k is None else k
        peak = base.get(remat, {"offload": 60, "offload-input": 55}.get(remat, 0)
                        + (4 - kk) * names * 10)
        return {"remat": remat, "offload_layers": k, "peak": peak,
                "host_offload_formula": kk * names * 10, "host_offload_per_host": kk * names * 10}
    return plan_at


def test_choose_remat_order_and_offload_layers():
    calls = []
    p = plan.choose_remat(_fake_plan_at(calls), 4, plan.Budgets(device=100))
    assert (p["remat"], p["offload_layers"]) == ("offload", 2)       # 60 + 2 x 20 = 100
    assert calls[:4] == [("none", None), ("save-dots", None), ("full", None), ("offload", None)]
    # host 30 per host: offload needs 40 at K=2 -> offload-input with no layer offloaded
    p = plan.choose_remat(_fake_plan_at([]), 4, plan.Budgets(device=100, host=30))
    assert (p["remat"], p["offload_layers"]) == ("offload-input", 0)
    assert plan.choose_remat(_fake_plan_at([]), 4, plan.Budgets(device=50)) is None
    assert plan.choose_remat(_fake_plan_at([]), 4, plan.Budgets(device=500))["remat"] == "none"


@pytest.mark.slow   # 70 s; fast: the same logic on modelled peaks, and train --remat auto
def test_choose_remat_equals_brute_force_on_compiled_plans():
    """On CPU-compiled plans of a tiny model: the choice is the first policy, in order of
    recomputed FLOPs and then offloaded layers, whose compiled plan fits (every candidate
    compiled), for budgets placed at each candidate's own peak."""
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    lora = LoraConfig(rank=4, alpha=8.0, targets="all")
    cache = {}

    def plan_at(remat, k=None):
        if (remat, k) not in cache:
            cache[(remat, k)] = plan.plan_memory(cfg, 1, 1, 512, lora=lora, dtype="float32",
                                                 remat=remat, attention="blockwise",
                                                 offload_layers=k)
        return cache[(remat, k)]

    order = [("none", None), ("save-dots", None), ("full", None)] + [
        (r, k) for r in ("offload", "offload-input") for k in range(cfg.num_layers + 1)]
    peaks = {c: plan_at(*c)["peak"] for c in order}
    assert peaks[("offload", 3)] < peaks[("offload", 0)]              # offloading frees device
    for device in sorted(set(peaks.values())):
        host = plan_at("offload-input", 1)["host_offload_per_host"]
        b = plan.Budgets(device=device, host=host)
        brute = next((c for c in order if b.fits(plan_at(*c))), None)
        got = plan.choose_remat(plan_at, cfg.num_layers, b)
        assert (got is None) == (brute is None)
        if got is not None:
            assert b.fits(got)
            got_c = (got["remat"], got["offload_layers"])
            # the same policy family as the brute force (the offloaded layers may differ
            # only where XLA's peaks are not monotone in them)
            assert got_c[0] == brute[0], (device, got_c, brute)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=2)


def _train(tiny, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "spmd_lora", "train", "--model", str(tiny), "--data", ALPACA,
         "--output-dir", str(out), "--template", "alpaca", "--max-seq-len", "128",
         "--lora-rank", "4", "--max-steps", "1", *extra],
        capture_output=True, text=True, timeout=600)


def test_train_refuses_a_run_past_the_host_budget(tiny, tmp_path):
    r = _train(tiny, tmp_path / "out", "--remat", "offload", "--host-memory", "1KB")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: host memory: remat offload keeps"), r.stderr
    assert "--host-memory is 1.0 KiB: short by" in lines[-1]
    assert not (tmp_path / "out").exists()                 # checked before anything is written


def test_train_remat_auto_and_offload_layers(tiny, tmp_path):
    r = _train(tiny, tmp_path / "auto", "--remat", "auto")
    assert r.returncode == 0, r.stderr
    assert "remat auto chose --remat none" in r.stdout + r.stderr
    r = _train(tiny, tmp_path / "k", "--remat", "offload-input", "--offload-layers", "1",
               "--host-memory", "1GB")
    assert r.returncode == 0, r.stderr


def test_plan_flag_errors(capsys):
    for argv, text in (
            (["--remat", "auto"], "--remat auto needs --device-memory"),
            (["--remat", "full", "--offload-layers", "2"], "--offload-layers applies to"),
            (["--remat", "offload", "--offload-layers", "99"], "--offload-layers must be in 0..32"),
            (["--host-memory", "lots"], "--host-memory")):
        with pytest.raises(SystemExit) if argv[0] == "--host-memory" else _no_raise():
            rc = cli.plan.main(["--model", "llama2-7b", *argv])
            assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and text in err, err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_launch_tells_each_process_how_many_share_the_host():
    from spmd_lora.runtime.launch import child_envs
    envs = child_envs(3, 2, 12345, base={"JAX_PLATFORMS": "cpu"})
    assert [e["SPMD_LORA_LOCAL_PROCESSES"] for e in envs] == ["3", "3", "3"]
