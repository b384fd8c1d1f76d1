"""GPU compile targets, the kernel report parsers and the GPU census, without the CUDA plugin
(issue 23). The compiles themselves are in test_gpu_compile.py (CI job 3)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_lora.analysis import gpu_kernels, gpu_targets, hlo
from spmd_lora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = gpu_targets.cuda_plugin_installed()


def test_targets_and_aliases():
    assert {"h100", "h100-pcie", "h200", "a100", "b200"} <= set(gpu_targets.target_names())
    assert gpu_targets.resolve_target("H100-SXM").device_kind == "NVIDIA H100 80GB HBM3"
    assert gpu_targets.resolve_target("a100-80gb").compute_capability == (8, 0)
    with pytest.raises(ConfigError, match=r"--target: unknown GPU 'h900'.*h100"):
        gpu_targets.resolve_target("h900")


def test_target_text_carries_the_published_figures():
    t = gpu_targets.resolve_target("h200")
    text = gpu_targets._render(t, gpu_targets._device_info_lines(t))
    for line in ("core_count: 132", f"device_memory_size: {143771 * 2 ** 20}",
                 "memory_bandwidth: 4800000000000", "shared_memory_per_block_optin: 232448",
                 "cuda_compute_capability { major: 9 minor: 0 }", 'platform_name: "CUDA"',
                 'device_description_str: "NVIDIA H200"'):
        assert line in text, line
    assert text.count("{") == text.count("}")
    assert 140 < t.memory_gib < 141


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def _error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.skipif(PLUGIN, reason="the CUDA plugin is installed here")
@pytest.mark.parametrize("cmd", [["-m", "spmd_lora", "plan"], ["tools/profile.py"]])
def test_target_without_the_cuda_plugin_names_the_extra(cmd):
    line = _error_line(_run(*cmd, "--model", "llama3-8b", "--tp", "8", "--max-seq-len", "4096",
                            "--target", "h100"))
    assert 'pip install -e ".[cuda12]"' in line and "--target" in line


def test_target_flag_mistakes_are_one_error_line():
    line = _error_line(_run("-m", "spmd_lora", "plan", "--model", "llama3-8b", "--target",
                            "h900"))
    assert "unknown GPU 'h900'" in line and "b200" in line
    line = _error_line(_run("-m", "spmd_lora", "plan", "--model", "llama3-8b", "--hosts", "2"))
    assert "--hosts" in line and "--target" in line


# ----------------------------------------------------------------------------- kernel report

THUNKS = """\
001: kCustomKernel [source       | next=004 (3)] loop_pad_fusion_1 grid: [2048, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
004: kCustomKernel [prev=003 (1) | next=005 (1)] spmd_lora_flash_fwd grid: [8, 1, 8] threads: [256, 1, 1]  shared_memory: 98304 bytes
    048: kCustomKernel       [prev=037 (7)  | next=049 (1) ] gemm_fusion_dot_general_350 grid: [8192, 1, 1] threads: [64, 1, 1]  shared_memory: 768 bytes
    052: kCustomKernel       [prev=036 (12) | next=053 (1) ] gemm_fusion_dot_general_350 grid: [8192, 1, 1] threads: [64, 1, 1]  shared_memory: 768 bytes
009: kCopy         [prev=008 (1) | next=011 (2)] kCopy
"""
PTXAS = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function 'spmd_lora_flash_fwd'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spmd_lora_flash_fwd' for 'sm_90a'
ptxas info    : Function properties for spmd_lora_flash_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 171 registers, used 1 barriers
ptxas info    : Compiling entry function 'gemm_fusion_dot_general_350' for 'sm_90a'
ptxas info    : Function properties for gemm_fusion_dot_general_350
    24 bytes stack frame, 40 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""
HLO_NAMES = """\
  %gemm_fusion_dot_general.350 = bf16[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %loop_pad_fusion.1 = bf16[8,4]{1,0} fusion(%a), kind=kLoop, calls=%d
  %custom-call.3 = (bf16[1,8]{1,0}) custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"spmd_lora_flash_fwd","ir":"..."}
"""


def test_kernel_report_parsers():
    kernels = gpu_kernels.parse_thunks(THUNKS)
    assert set(kernels) == {"loop_pad_fusion_1", "spmd_lora_flash_fwd",
                            "gemm_fusion_dot_general_350"}
    fwd = kernels["spmd_lora_flash_fwd"]
    assert (fwd.grid, fwd.threads, fwd.shared_memory, fwd.launches) == ((8, 1, 8), (256, 1, 1),
                                                                        98304, 1)
    assert kernels["gemm_fusion_dot_general_350"].launches == 2
    stats = gpu_kernels.parse_ptxas(PTXAS)
    assert stats["spmd_lora_flash_fwd"] == {"arch": "sm_90a", "serialized_wgmma": True,
                                            "stack": 0, "spill_stores": 0, "spill_loads": 0,
                                            "registers": 171}
    assert stats["gemm_fusion_dot_general_350"]["spill_stores"] == 40
    ours, fusions = gpu_kernels.triton_kernel_names(HLO_NAMES)
    assert ours == {"spmd_lora_flash_fwd"} and fusions == {"gemm_fusion_dot_general_350"}


def test_kernels_from_dump_marks_kinds_and_runs_ptxas_only_on_triton(tmp_path, monkeypatch):
    (tmp_path / "m.thunk_sequence.txt").write_text(THUNKS)
    (tmp_path / "m.1.ptx").write_text(".version 8.8\n.target sm_90a\n"
                                      ".visible .entry spmd_lora_flash_fwd(\n")
    (tmp_path / "m.2.ptx").write_text(".version 8.8\n.target sm_90a\n"
                                      ".visible .entry loop_pad_fusion_1(\n")
    ran = []

    def fake_ptxas(ptxas, path, arch):
        ran.append((Path(path).name, arch))
        return PTXAS
    monkeypatch.setattr(gpu_kernels, "_run_ptxas", fake_ptxas)
    monkeypatch.setattr(gpu_kernels, "ptxas_path", lambda: "/bin/ptxas")
    kernels = gpu_kernels.kernels_from_dump(str(tmp_path), HLO_NAMES)
    assert ran == [("m.1.ptx", "sm_90a")]          # the LLVM-emitted pad fusion is not re-run
    by = {k.name: k for k in kernels}
    assert [k.kind for k in kernels] == ["ours", "triton", "xla"]
    assert by["spmd_lora_flash_fwd"].registers == 171 and by["spmd_lora_flash_fwd"].spill_bytes == 0
    assert by["loop_pad_fusion_1"].registers is None
    summary = gpu_kernels.summarize(kernels)
    assert summary["ours"]["spilling"] == [] and summary["ours"]["max_shared_memory"] == 98304


# ----------------------------------------------------------------------------- GPU census

GPU_HLO = """\
HloModule jit_step, is_scheduled=true

%wrapped_concatenate_computation (param_0: f32[128], param_1: f32[4096]) -> f32[4224] {
  %param_0 = f32[128]{0} parameter(0)
  %param_1 = f32[4096]{0} parameter(1)
  ROOT %concatenate.1 = f32[4224]{0} concatenate(%param_0, %param_1), dimensions={0}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (p0: f32[2,4,16], p1: f32[2,16,128], p2: bf16[8,64]) -> (f32[4224], bf16[64,64]) {
  %p0 = f32[2,4,16]{2,1,0} parameter(0)
  %p1 = f32[2,16,128]{2,1,0} parameter(1)
  %p2 = bf16[8,64]{1,0} parameter(2)
  %bitcast.1 = f32[128]{0} bitcast(%p0)
  %bitcast.2 = f32[4096]{0} bitcast(%p1)
  %wrapped_concatenate = f32[4224]{0} fusion(%bitcast.1, %bitcast.2), kind=kLoop, calls=%wrapped_concatenate_computation
  %all-reduce-start = f32[4224]{0} all-reduce-start(%wrapped_concatenate), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %all-reduce-done = f32[4224]{0} all-reduce-done(%all-reduce-start)
  %all-gather-start = (bf16[8,64]{1,0}, bf16[64,64]{1,0}) all-gather-start(%p2), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %all-gather-done = bf16[64,64]{1,0} all-gather-done(%all-gather-start)
  ROOT %t = (f32[4224]{0}, bf16[64,64]{1,0}) tuple(%all-reduce-done, %all-gather-done)
}
"""


def test_gpu_census_counts_async_pairs_once_and_unbundles_concatenated_all_reduces():
    census = hlo.collective_census(GPU_HLO, {"dp": 1, "cp": 1, "tp": 8})
    by_kind = {r["kind"]: r for r in census}
    assert len(census) == 2
    ar = by_kind["all-reduce"]
    assert ar["concatenated"] and ar["operands"] == 2
    assert ar["shapes"] == ["f32[2,4,16]", "f32[2,16,128]"]       # the LoRA gradients' shapes
    assert ar["bytes"] == 4224 * 4 and ar["axis"] == "tp"
    ag = by_kind["all-gather"]
    assert ag["shapes"] == ["bf16[64,64]"] and not ag["concatenated"] and ag["dimension"] == 0
    meas = hlo.measured(census, lora_rank=16)
    assert meas["lora_grad_reductions"] == 2 and meas["tp_activation_reductions"] == 0
