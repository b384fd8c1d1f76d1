"""``spmd-lora dashboard`` / ``plot`` / ``--report-to tensorboard`` / ``census.json`` on a real
demo run (built once, with torch hidden as on a bare install) and on a live run started from the
page's form; path traversal refused; a failing handler and a missing run directory; a slow
headless-Chromium check of the drawn charts."""
import contextlib
import http.client
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spmd_lora.cli import commands as cli
from spmd_lora.dashboard import launcher, runs
from spmd_lora.dashboard.server import Dashboard, is_loopback, make_server
from spmd_lora.tiny import asset_path
from spmd_lora.train import TrainConfig

# Runs the demo the way a user on a bare install does: torch is not importable.
DEMO_WITHOUT_TORCH = """
import importlib.util, sys
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] == "torch" else _find(name, *a, **k))
from spmd_lora import cli
sys.exit(cli.main(["demo", "--output", sys.argv[1], "--max-steps", "8",
                   "--report-to", "tensorboard"]))
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    p = subprocess.run([sys.executable, "-c", DEMO_WITHOUT_TORCH, str(out)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@contextlib.contextmanager
def _serving(run_dirs, new_runs_dir):
    """A dashboard on a free loopback port, serving in a thread."""
    srv, dash = make_server(run_dirs, port=0, new_runs_dir=new_runs_dir)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv, dash
    finally:
        srv.shutdown()
        srv.server_close()
        for child in dash.children.values():
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.fixture()
def server(demo, tmp_path):
    """A dashboard over the demo run and a directory with no run yet."""
    with _serving([demo[0] / "run", tmp_path / "empty"], tmp_path / "new") as served:
        yield served


@pytest.fixture()
def bare_server(tmp_path):
    """A dashboard over a run with one metrics line and a directory with no run yet (no demo
    needed)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with _serving([run, tmp_path / "later"], tmp_path / "new") as served:
        yield served


def _request(srv, path, method="GET", body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def _get(srv, path):
    status, data = _request(srv, path)
    assert status == 200, (path, status, data[:300])
    return json.loads(data)


def test_demo_output_on_a_bare_install(demo):
    """No "PyTorch was not found" line; eval loss before -> after; loss.png, census.json,
    run_config.json and TensorBoard events written."""
    out, p = demo
    assert "PyTorch" not in p.stderr.splitlines()[0] and "PyTorch was not found" not in p.stderr
    before, after = map(float, __import__("re").search(
        r"eval loss ([\d.]+) -> ([\d.]+) \(held-out", p.stdout).groups())
    assert after < before
    run = out / "run"
    assert f"loss plot in {run / 'loss.png'}" in p.stdout
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["train"]["tp"] == 2 and cfg["mesh"]["axes"] == {"dp": 1, "cp": 1, "tp": 2}
    census = json.loads((run / "census.json").read_text())
    # tp=2 with sequence parallelism: all-gathers / reduce-scatters of activations, nothing else
    assert census["measured"]["other_ops"] == 0 and census["memory_per_device"]["peak"] > 0
    assert {r["axis"] for r in census["census"]} >= {"tp"}
    # the first step reuses the census's compile: it takes far less than a compile
    step1 = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if r["step"] == 1 and "loss" in r)
    assert 4 * 256 / step1["tokens_per_s"] < census["compile_s"] / 2, (step1, census["compile_s"])
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_json_endpoints_on_a_finished_run(server, demo):
    srv, _ = server
    listed = _get(srv, "/api/runs")
    assert [r["status"] for r in listed] == ["finished", "missing"]
    rows = _get(srv, "/api/runs/0/metrics")["rows"]
    on_disk = runs.read_metrics(demo[0] / "run")
    assert rows == on_disk and [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert rows[0] == {"step": 0, **{k: rows[0][k] for k in ("eval_loss", "eval_perplexity")}}
    tail = _get(srv, "/api/runs/0/metrics?since=5")
    assert tail["rows"] == on_disk[5:] and tail["next"] == len(on_disk)
    s = _get(srv, "/api/runs/0/summary")
    assert s["status"] == "finished" and s["message"] is None and s["adapter"] and s["loss_png"]
    assert s["config"]["lora_rank"] == 8 and s["mesh"]["axes"]["tp"] == 2
    assert [c["name"] for c in s["checkpoints"]] == ["step_8"] and s["checkpoints"][0]["bytes"] > 0
    assert s["memory"]["compiled_step"]["peak"] > 0 and s["census"]["summary"]
    empty = _get(srv, "/api/runs/1/summary")
    assert "does not exist (yet)" in empty["message"]
    (Path(empty["path"])).mkdir()
    assert "no metrics yet in" in _get(srv, "/api/runs/1/summary")["message"]
    page = _request(srv, "/")[1].decode()
    assert "/static/app.js" in page and "http" not in page.replace("http-equiv", "")   # no CDN
    assert b"polyline" in _request(srv, "/static/app.js")[1]
    assert _get(srv, "/api/new-run-template")["model"].endswith("tiny_llama")


def test_the_finished_run_offers_export_commands_that_work(server, demo, tmp_path):
    """The summary's export commands (merged HF, merged GGUF, GGUF LoRA), run as a user would
    paste them (outputs moved to tmp_path): each succeeds and writes what it names."""
    srv, _ = server
    commands = _get(srv, "/api/runs/0/summary")["export_commands"]
    run = demo[0] / "run"
    assert [c["command"].split("--output ")[1] for c in commands] == [
        str(run / "merged"), str(run / "model-f16.gguf"), str(run / "adapter.gguf")]
    assert all(f"--adapter {run / 'adapter'}" in c["command"] for c in commands)
    have_gguf = importlib.util.find_spec("gguf") is not None
    for c in commands:
        argv = shlex.split(c["command"])
        out = argv.index("--output") + 1
        argv[out] = str(tmp_path / Path(argv[out]).name)
        assert argv[:2] == ["spmd-lora", "export"]
        if "--format" in argv and not have_gguf:
            continue                    # job 2 installs no gguf
        assert cli.main(argv[1:]) == 0, c
    assert (tmp_path / "merged" / "config.json").is_file()
    if have_gguf:
        import gguf

        merged = gguf.GGUFReader(tmp_path / "model-f16.gguf")
        lora = gguf.GGUFReader(tmp_path / "adapter.gguf")
        assert any(t.name == "output_norm.weight" for t in merged.tensors)
        assert all(t.name.endswith((".lora_a", ".lora_b")) for t in lora.tensors)
    assert _get(srv, "/api/runs/1/summary").get("export_commands", []) == []


def test_prompt_box_generates_from_the_runs_adapter(server, demo):
    srv, _ = server
    headers = {"Content-Type": "application/json", "X-Spmd-Lora": "1"}
    body = json.dumps({"prompt": "Give three tips for staying healthy.", "max_new_tokens": 4})
    status, data = _request(srv, "/api/runs/0/generate", "POST", body, headers)
    assert status == 200, data
    assert isinstance(json.loads(data)["completion"], str), data     # an error has no completion
    status, data = _request(srv, "/api/runs/1/generate", "POST", body, headers)
    assert status == 400 and b"has no run_config.json" in data
    assert _request(srv, "/api/runs/9/generate", "POST", body, headers)[0] == 404
    assert _request(srv, "/api/runs/0/generate", "POST", body, {})[0] == 403


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2f..%2fetc%2fpasswd",
    "/static/%2E%2E%5C%2E%2E%5Cetc%5Cpasswd", "/api/runs/0/..%252f..%252f..%252fetc%252fpasswd",
    "/static/%252e%252e/%252e%252e/etc/passwd", "/etc/passwd", "/static/../../../etc/passwd",
    "/api/runs/7/summary", "/api/runs/-1/metrics", "/api/runs/0/../../summary",
])
def test_paths_outside_the_runs_are_refused(server, path):
    status, body = _request(server[0], path)
    assert status in (400, 404) and b"root:" not in body


def test_new_run_form_starts_a_live_run_whose_metrics_and_log_appear(server, demo, tmp_path):
    srv, dash = server
    config = {"model": str(demo[0] / "tiny_llama"), "data": str(asset_path("alpaca_sample.jsonl")),
              "template": "alpaca", "max_seq_len": 128, "lora_rank": 4, "batch_size": 2,
              "max_steps": 6, "tp": 2, "census": False}
    form = json.dumps({"name": "live", "config": config})
    headers = {"Content-Type": "application/json", "X-Spmd-Lora": "1"}
    assert _request(srv, "/api/runs", "POST", form, {"Content-Type": "application/json"})[0] == 403
    bad = json.dumps({"name": "../escape", "config": config})
    status, body = _request(srv, "/api/runs", "POST", bad, headers)
    assert status == 400 and b"plain name" in body
    status, body = _request(srv, "/api/runs", "POST",
                            json.dumps({"name": "x", "config": {**config, "attention": "flash"}}), headers)
    assert status == 400 and b"attention 'flash' unknown" in body
    assert not (tmp_path / "new").exists()                    # nothing written for a bad form

    status, body = _request(srv, "/api/runs", "POST", form, headers)
    assert status == 200, body
    run_id = json.loads(body)["id"]
    run_dir = tmp_path / "new" / "live"
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert TrainConfig(**saved) == TrainConfig(**config, output_dir=str(run_dir.resolve()))
    seen, deadline = [], time.time() + 300                   # (status, rows with a loss) per poll
    while time.time() < deadline:
        status = _get(srv, "/api/runs")[run_id]["status"]
        rows = _get(srv, f"/api/runs/{run_id}/metrics")["rows"]
        seen.append((status, len([r for r in rows if "loss" in r])))
        if dash.children[run_id].poll() is not None:
            break
        time.sleep(0.1)
    assert dash.children[run_id].returncode == 0, _get(srv, f"/api/runs/{run_id}/log")["text"]
    assert seen[0] == ("running", 0)
    assert any(st == "running" and n > 0 for st, n in seen), seen   # metrics while it runs
    counts = [n for _, n in seen]
    assert counts == sorted(counts)
    assert _get(srv, "/api/runs")[run_id]["status"] == "finished"
    assert not (run_dir / "census.json").exists()                  # --no-census from the form
    assert len([r for r in _get(srv, f"/api/runs/{run_id}/metrics")["rows"] if "loss" in r]) == 6
    log = _get(srv, f"/api/runs/{run_id}/log")
    assert log["text"].startswith("$ spmd-lora train --model ") and "adapter written to" in log["text"]
    assert _get(srv, f"/api/runs/{run_id}/log?offset={log['next']}")["text"] == ""


def test_the_log_is_read_on_whole_characters(tmp_path):
    """A read that ends inside a multi-byte character leaves its bytes for the next read."""
    text = "step 1 ☃ loss 2.0 — 日本\n"
    (tmp_path / "train.log").write_bytes(text.encode())
    got, offset = "", 0
    for limit in (8, 3, 1, 5, 2, 100):
        part = runs.read_log(tmp_path, offset, limit)
        assert "\ufffd" not in part["text"], part
        got, offset = got + part["text"], part["next"]
    assert got == text and offset == len(text.encode())


def test_a_failing_handler_answers_500_and_logs_one_line_once(bare_server, monkeypatch, capsys):
    """No traceback per request: the page gets a JSON error, the console one line per distinct
    failure however often the page polls."""
    srv, _ = bare_server

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(runs, "checkpoints_on_disk", broken)
    for _ in range(3):
        status, body = _request(srv, "/api/runs/0/summary?since=1")
        assert status == 500 and json.loads(body) == {"error": "RuntimeError: disk on fire"}
    assert _get(srv, "/api/runs/0/metrics")["rows"] == [{"step": 1, "loss": 2.0}]  # others work
    monkeypatch.setattr(runs, "read_log", broken)
    assert _request(srv, "/api/runs/0/log")[0] == 500
    try:
        raise ValueError("garbled request")
    except ValueError:
        srv.handle_error(None, ("10.1.2.3", 4567))              # outside the handlers
    assert capsys.readouterr().err.splitlines() == [
        "dashboard: GET /api/runs/0/summary failed: RuntimeError: disk on fire",
        "dashboard: GET /api/runs/0/log failed: RuntimeError: disk on fire",
        "dashboard: request from 10.1.2.3 failed: ValueError: garbled request"]


def test_a_missing_run_directory_says_only_that(bare_server, tmp_path):
    """Given on the command line before it exists, or deleted while the dashboard runs."""
    srv, _ = bare_server
    assert [r["status"] for r in _get(srv, "/api/runs")] == ["running", "missing"]
    shutil.rmtree(tmp_path / "run")
    assert [r["status"] for r in _get(srv, "/api/runs")] == ["missing", "missing"]
    for i, name in enumerate(["run", "later"]):
        status, body = _request(srv, f"/api/runs/{i}/summary")
        s = json.loads(body)
        assert status == 200 and s["exists"] is False and s["status"] == "missing"
        assert s["message"] == (f"run directory {(tmp_path / name).resolve()} does not exist "
                                f"(yet); the page fills in when training writes to it")
        assert b"census" not in body and b"metrics" not in body and b"checkpoint" not in body
        assert _get(srv, f"/api/runs/{i}/metrics") == {"rows": [], "next": 0}
        assert _get(srv, f"/api/runs/{i}/log")["exists"] is False


def test_new_runs_dir_that_cannot_be_created_is_a_400(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    form = json.dumps({"name": "x", "config": {"model": str(tmp_path),
                                               "data": str(asset_path("alpaca_sample.jsonl"))}})
    headers = {"Content-Type": "application/json", "X-Spmd-Lora": "1"}
    with _serving([], afile / "new") as (srv, dash):
        status, body = _request(srv, "/api/runs", "POST", form, headers)
    assert status == 400 and json.loads(body)["error"] == (
        f"--new-runs-dir {afile / 'new'}: cannot create the directory: Not a directory")
    assert not dash.children and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_foreign_host_header_is_refused(server):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:8050", "127.0.0.1.evil.example"):
        status, _ = _request(server[0], "/api/runs", headers={"Host": host})
        assert status == 403, host
    for host in ("localhost:1", "127.0.0.1", "[::1]:8050"):
        assert _request(server[0], "/api/runs", headers={"Host": host})[0] == 200, host


def test_read_metrics_leaves_a_half_written_line_for_later(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert runs.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('ss": 1.5}\n')
    assert runs.read_metrics(tmp_path, since=1) == [{"step": 2, "loss": 1.5}]


def test_form_is_only_offered_on_loopback(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(PermissionError):
        Dashboard([], tmp_path, allow_launch=False).new_run({"name": "a", "config": {}})


def test_measured_peak_is_the_largest_reported(demo, tmp_path):
    from spmd_lora.reporting import peak_bytes_in_use

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    assert peak_bytes_in_use([Device({"peak_bytes_in_use": 5}), Device({"peak_bytes_in_use": 9})]) == 9
    assert peak_bytes_in_use([Device(None), Device({})]) is None          # CPU: not reported
    gpu_like = tmp_path / "run"
    shutil.copytree(demo[0] / "run", gpu_like)
    step = runs.read_metrics(gpu_like)[1]
    with open(gpu_like / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**step, "step": 9, "peak_bytes": 3 << 30}) + "\n")
    assert runs.summary(gpu_like)["memory"]["measured_peak_bytes"] == 3 << 30


def test_train_flags_reproduce_the_config():
    cfg = TrainConfig(model="m", data="d.jsonl", output_dir="o", tp=2, lora_targets="all",
                      pack=True, learning_rate=1e-3, max_steps=5, census=False)
    args = cli.build_parser().parse_args(["train", *launcher.train_flags(cfg)])
    assert cli._train_config(args) == cfg


def test_plot_command_and_missing_matplotlib(demo, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(demo[0] / "run" / "metrics.jsonl", run / "metrics.jsonl")
    assert cli.main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'loss.png'}"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    (run / "loss.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot", str(run)]) == 0
    assert "loss.png skipped: matplotlib is not installed" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
    assert f"error: run directory not found: {tmp_path / 'nothing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_page_in_headless_chromium_draws_the_data(server, demo, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    srv, _ = server
    url = "http://%s:%d/" % srv.server_address[:2]
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1400,1800", "--virtual-time-budget=6000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    shot = tmp_path / "dashboard.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG"
    import re
    rows = runs.read_metrics(demo[0] / "run")
    n_loss = len([r for r in rows if "loss" in r])
    n_eval = len([r for r in rows if "eval_loss" in r])
    for key, n in (("loss", n_loss), ("eval_loss", n_eval), ("lr", n_loss),
                   ("grad_norm", n_loss), ("tokens_per_s", n_loss)):
        svg = re.search(rf'<svg[^>]*data-key="{key}"[^>]*>(.*?)</svg>', dom, re.S)
        assert svg, key
        line = re.search(r'<polyline[^>]*data-run="0"[^>]*>', svg.group(1))
        assert line and f'data-points="{n}"' in line.group(0), (key, line)
    last_loss = [r["loss"] for r in rows if "loss" in r][-1]
    assert f'data-last="{last_loss}"' in dom
    assert "does not exist (yet)" in dom and "step_8" in dom and "collective census" in dom


def test_every_dpo_metric_has_a_chart():
    """Each metric a DPO run logs (TRL's rewards/* and logps/*) has a chart on the page,
    shown only when a run logs it (as the rag generation metrics)."""
    import re
    from spmd_lora.model import PREFERENCE_METRICS
    page = (Path(runs.__file__).parent / "static" / "index.html").read_text()
    charts = dict(re.findall(r'data-key="([^"]+)"( data-optional="1")?', page))
    keys = [*PREFERENCE_METRICS, "eval_rewards/accuracies", "eval_rewards/margins"]
    assert all(charts.get(k) == ' data-optional="1"' for k in keys), charts
