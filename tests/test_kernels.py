"""Attention kernels (issue #4): Pallas flash attention, blockwise attention, registry.

Every implementation is checked against ``reference_attention`` (forward and dq/dk/dv of a
random-cotangent-weighted sum) on fresh random inputs: causal / non-causal, GQA 4:1, packed
segment ids, lengths that are not a multiple of the block, several block sizes, fp32 and
bf16/fp16; inside ``jax.shard_map(check_vma=True)`` with the gradient taken outside.
Errors are max|a - b| / max|b|. Pallas runs interpreted on CPU, so shapes stay small; test
jits use XLA optimisation level 0 (4x faster compiles, same numerics).
"""
import os
import sys

if "jax" not in sys.modules:  # tests/conftest.py normally does this first
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from spmd_lora.kernels import (BlockSizes, attention, blockwise_attention,  # noqa: E402
                               flash_attention, reference_attention, registry, resolve_impl)

jax.config.update("jax_default_matmul_precision", "highest")

FAST_COMPILE = {"xla_backend_optimization_level": 0}
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}
_SEED = [0]


def _fresh_key():
    _SEED[0] += 1
    return jax.random.PRNGKey(1000 + _SEED[0])


def _inputs(b, s, h, kv, d, dtype, segments):
    ks = jax.random.split(_fresh_key(), 5)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kv, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (b, s, h, d), jnp.float32)
    seg = None
    if segments:
        # packed sequences: 1-4 documents per row, random boundaries
        cuts = jax.random.randint(ks[4], (b, 3), 0, s)
        seg = jnp.sum(jnp.arange(s)[None, :, None] >= cuts[:, None, :], axis=-1)
        seg = seg.astype(jnp.int32)
    return q, k, v, ct, seg


def _fwd_bwd(fn, q, k, v, ct):
    def f(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _check(fn, b, s, h, kv, d, dtype, causal, segments, label):
    q, k, v, ct, seg = _inputs(b, s, h, kv, d, dtype, segments)
    out, grads = _fwd_bwd(lambda q, k, v: fn(q, k, v, causal=causal, segment_ids=seg),
                          q, k, v, ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]  # oracle: fp32 on the same inputs
    ref_out, ref_grads = _fwd_bwd(
        lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg),
        *f32, ct)
    assert out.shape == q.shape and out.dtype == q.dtype
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    print(f"\n{label}: max rel err fwd {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
          f"dv {errs[3]:.2e}")
    assert all(np.isfinite(errs)), errs
    assert max(errs) <= TOL[dtype], (label, errs)
    return errs


# (b, s, h, kv, d, dtype, causal, segments, block sizes) -- small: pallas is interpreted
PALLAS_CASES = {
    "f32-causal-gqa4-seg-S200-b64": (2, 200, 8, 2, 16, jnp.float32, True, True,
                                     BlockSizes(64, 64, 64, 64)),
    "f32-noncausal-gqa4-seg-S200-d24-b32x64": (1, 200, 8, 2, 24, jnp.float32, False, True,
                                               BlockSizes(32, 64, 64, 32)),
    "f32-causal-mha-S128-b32": (1, 128, 2, 2, 32, jnp.float32, True, False,
                                BlockSizes(32, 32, 32, 32)),
    "bf16-causal-gqa4-seg-default-blocks": (1, 256, 4, 1, 32, jnp.bfloat16, True, True, None),
    "f16-noncausal-S72-b16x32": (1, 72, 2, 1, 16, jnp.float16, False, False,
                                 BlockSizes(16, 32, 32, 16)),
}


@pytest.mark.parametrize("case", list(PALLAS_CASES), ids=list(PALLAS_CASES))
def test_flash_attention_matches_reference(case):
    b, s, h, kv, d, dtype, causal, segments, bs = PALLAS_CASES[case]
    fn = lambda q, k, v, **kw: flash_attention(q, k, v, block_sizes=bs, **kw)  # noqa: E731
    _check(fn, b, s, h, kv, d, dtype, causal, segments, f"pallas {case}")


# blockwise is plain XLA: a wider sweep, including block sizes that are not powers of two
BLOCKWISE_CASES = {
    "f32-causal-mha-b32": (2, 128, 2, 2, 32, jnp.float32, True, False, (32, 32)),
    "f32-noncausal-gqa4-b64x32": (1, 128, 8, 2, 32, jnp.float32, False, False, (64, 32)),
    "f32-causal-gqa4-seg-S200": (2, 200, 8, 2, 16, jnp.float32, True, True, (64, 64)),
    "f32-noncausal-seg-S200-d24": (1, 200, 4, 2, 24, jnp.float32, False, True, (32, 64)),
    "f32-causal-seg-S100-b48x40": (2, 100, 4, 1, 16, jnp.float32, True, True, (48, 40)),
    "f32-causal-single-block": (1, 96, 4, 2, 16, jnp.float32, True, False, (None, None)),
    "bf16-causal-gqa4-seg": (1, 256, 4, 1, 32, jnp.bfloat16, True, True, (64, 128)),
    "bf16-noncausal-S200": (1, 200, 2, 2, 32, jnp.bfloat16, False, False, (64, 32)),
    "f16-causal-S72": (2, 72, 2, 1, 16, jnp.float16, True, False, (16, 32)),
}


@pytest.mark.parametrize("case", list(BLOCKWISE_CASES), ids=list(BLOCKWISE_CASES))
def test_blockwise_attention_matches_reference(case):
    b, s, h, kv, d, dtype, causal, segments, (bq, bk) = BLOCKWISE_CASES[case]
    fn = lambda q, k, v, **kw: blockwise_attention(q, k, v, block_q=bq, block_k=bk,  # noqa
                                                   **kw)
    _check(fn, b, s, h, kv, d, dtype, causal, segments, f"blockwise {case}")


@pytest.mark.parametrize("impl", ["auto", "xla", "blockwise", "pallas"])
def test_attention_dispatch(impl):
    q, k, v, _, seg = _inputs(1, 64, 4, 2, 16, jnp.float32, True)
    bs = BlockSizes(32, 32, 32, 32) if impl == "pallas" else None
    out = jax.jit(lambda q, k, v, seg: attention(q, k, v, causal=True, segment_ids=seg,
                                                 impl=impl, block_sizes=bs),
                  compiler_options=FAST_COMPILE)(q, k, v, seg)
    ref = reference_attention(q, k, v, causal=True, segment_ids=seg)
    assert _rel(out, ref) <= 2e-5


def test_invalid_impl_raises():
    q, k, v, _, _ = _inputs(1, 16, 2, 2, 16, jnp.float32, False)
    with pytest.raises(ValueError, match="allowed values.*auto.*pallas.*blockwise.*xla.*cudnn"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="allowed values"):
        resolve_impl("triton")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cudnn is available on GPU")
def test_cudnn_needs_gpu():
    q, k, v, _, _ = _inputs(1, 16, 2, 2, 16, jnp.float32, False)
    with pytest.raises(ValueError, match="cudnn.*GPU"):
        attention(q, k, v, impl="cudnn")


def test_bad_shapes_raise():
    q = jnp.zeros((1, 16, 6, 16))
    k = jnp.zeros((1, 16, 4, 16))
    for fn in (flash_attention, blockwise_attention):
        with pytest.raises(ValueError, match="multiple of kv heads"):
            fn(q, k, k)
    with pytest.raises(ValueError):
        BlockSizes(block_q=48)


# ------------------------------------------------------------------------ shard_map + vma

SHARD_CASES = {
    # kv heads split over tp with the q heads that use them (H=4, KV=2 -> 2 q + 1 kv per device)
    "pallas-gqa-kv-split-seg": ("pallas", 4, 2, True, True),
    "blockwise-gqa-kv-split-seg": ("blockwise", 4, 2, True, True),
    # one kv head replicated on both devices (tp > KV): its gradient is summed over tp
    "pallas-kv-replicated-noncausal": ("pallas", 4, 1, False, False),
    "blockwise-kv-replicated": ("blockwise", 4, 1, True, True),
}


@pytest.mark.parametrize("case", list(SHARD_CASES), ids=list(SHARD_CASES))
def test_attention_in_shard_map_check_vma(case):
    impl, h, kv, causal, segments = SHARD_CASES[case]
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    b, s, d = 2, 64, 16
    q, k, v, ct, seg = _inputs(b, s, h, kv, d, jnp.float32, segments)
    if seg is None:
        seg = jnp.zeros((b, s), jnp.int32)
    heads = P(None, None, "tp", None)
    kv_spec = heads if kv % 2 == 0 else P()
    bs = BlockSizes(32, 32, 32, 32) if impl == "pallas" else BlockSizes(32, 64, 32, 64)

    def local(q, k, v, seg, ct):
        out = attention(q, k, v, causal=causal, segment_ids=seg if segments else None,
                        impl=impl, block_sizes=bs)
        return out, jnp.sum(out * ct)[None]

    sharded = jax.shard_map(local, mesh=mesh,
                            in_specs=(heads, kv_spec, kv_spec, P(), heads),
                            out_specs=(heads, P("tp")), check_vma=True)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    qd, kd, vd, ctd = put(q, heads), put(k, kv_spec), put(v, kv_spec), put(ct, heads)
    segd = put(seg, P())

    def loss(q, k, v):
        out, partial = sharded(q, k, v, segd, ctd)
        return jnp.sum(partial), out

    (val, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                                compiler_options=FAST_COMPILE)(qd, kd, vd)

    sref = seg if segments else None
    ref_loss = lambda q, k, v: jnp.sum(  # noqa: E731
        reference_attention(q, k, v, causal=causal, segment_ids=sref) * ct)
    ref_val, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    ref_out = reference_attention(q, k, v, causal=causal, segment_ids=sref)
    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    print(f"\nshard_map {case}: loss {float(val):.6f} vs {float(ref_val):.6f}; max rel err "
          f"fwd {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
    assert abs(float(val) - float(ref_val)) <= 1e-4 * max(1.0, abs(float(ref_val)))
    assert max(errs) <= 2e-5, errs


# ------------------------------------------------------------------------ GPU lowering

def test_kernels_follow_the_program_devices_not_the_default_backend():
    """Traced for an (abstract) GPU, a Pallas call compiles instead of interpreting and the
    registry picks the GPU's kernel, although the process' default backend is the CPU; traced
    for CPU devices (a shard_map over them) it interprets."""
    from spmd_lora.kernels import target
    from spmd_lora.kernels.gpu_lowering import abstract_gpu
    assert jax.default_backend() == "cpu"
    assert target.interpret_by_default()
    with abstract_gpu("NVIDIA H200"):
        dev = target.program_device()
        assert dev.is_gpu and dev.device_kind == "NVIDIA H200" and dev.source == "mesh"
        assert not target.interpret_by_default()
        choice = registry.choose("auto", seq_len=4096, head_dim=128)
        assert choice.impl == "pallas" and "Hopper" in choice.reason
    seen = {}

    def body(x):
        seen["device"] = target.program_device()
        seen["auto"] = registry.choose("auto", seq_len=64, head_dim=16).impl
        return x

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))).lower(
        jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.NamedSharding(mesh, P("x"))))
    assert seen["device"].backend == "cpu" and seen["device"].source == "mesh"
    assert seen["auto"] == "blockwise"


def test_pallas_lowers_to_triton_for_cuda():
    """The kernels (fwd, dq, dk/dv) lower to Triton custom calls for CUDA, checked from CPU
    through an abstract H100 (needed from jax 0.11 on), with no Triton deprecation warning;
    the kernel itself sees that the program is for a GPU (no ``interpret=False`` needed).

    Catches Triton-only constraints (power-of-two tiles, supported ops) without a GPU; it
    does not compile PTX.
    """
    import importlib
    import warnings

    from spmd_lora.kernels.gpu_lowering import lower_for_cuda
    fa_module = importlib.import_module("spmd_lora.kernels.flash_attention")  # the module

    q = jax.ShapeDtypeStruct((1, 200, 8, 2 * 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 200, 2, 2 * 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)
    bs = registry.choose("pallas", seq_len=200, head_dim=128, backend="gpu",
                         device_kind="NVIDIA H100 80GB HBM3").block_sizes

    def step(q, k, v, seg):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, causal=True, segment_ids=seg, block_sizes=bs), q, k, v)
        return out, vjp(out)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")          # what a user without our filter would see
        fa_module.quiet_triton_deprecation()     # the filter importing our kernels installs
        try:
            text = lower_for_cuda(step, q, kv, kv, seg)
        except (ImportError, ModuleNotFoundError) as e:  # jaxlib built without Triton dialect
            pytest.skip(f"no Triton lowering in this jaxlib: {e}")
    assert text.count("xla.gpu.triton") == 3, "expected fwd, dq and dk/dv Triton kernels"
    assert not [w for w in caught if "Triton backend is deprecated" in str(w.message)]


# ------------------------------------------------------------------------ registry

def test_registry_choices():
    assert resolve_impl("auto", backend="cpu") == "blockwise"
    assert resolve_impl("auto", backend="gpu") == "pallas"
    assert resolve_impl("xla", backend="cpu") == "xla"
    h100 = registry.choose("auto", seq_len=8192, head_dim=128, backend="gpu",
                           device_kind="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
    assert h100.impl == "pallas" and "Hopper" in h100.reason
    a100 = registry.choose("auto", seq_len=8192, head_dim=128, backend="gpu",
                           device_kind="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0))
    assert "Ampere" in a100.reason
    by_cc = registry.choose("auto", seq_len=8192, head_dim=64, backend="gpu",
                            device_kind="Some Future GPU", compute_capability=(10, 0))
    assert "Blackwell" in by_cc.reason
    by_cc = registry.choose("auto", seq_len=8192, head_dim=64, backend="gpu",
                            device_kind="Some Hopper variant", compute_capability=(9, 0))
    assert "Hopper" in by_cc.reason
    b200 = registry.choose("auto", seq_len=8192, head_dim=128, backend="gpu",
                           device_kind="NVIDIA B200")       # abstract devices have no cc
    assert "Blackwell" in b200.reason
    old = registry.choose("auto", seq_len=8192, head_dim=128, backend="gpu",
                          device_kind="Tesla V100-SXM2-16GB", compute_capability=(7, 0))
    assert "generic" in old.reason
    cpu = registry.choose("auto", seq_len=8192, head_dim=128, backend="cpu")
    assert cpu.impl == "blockwise" and cpu.block_sizes.block_q == 512
    mid = registry.choose("auto", seq_len=1024, head_dim=64, backend="cpu")
    assert mid.block_sizes.block_q == mid.block_sizes.block_k == 256
    short = registry.choose("auto", seq_len=512, head_dim=64, backend="cpu")
    assert short.block_sizes.block_q == short.block_sizes.block_k == 128
    override = BlockSizes(32, 32, 32, 32)
    assert registry.choose("pallas", seq_len=64, head_dim=16, backend="gpu",
                           device_kind="NVIDIA H100", block_sizes=override).block_sizes \
        is override


def test_register_gpu_entry():
    entry = registry.GpuEntry(name="test-gpu", device_kinds=("testgpu x1",),
                              min_compute_capability=None,
                              block_sizes=((256, BlockSizes(32, 32, 16, 16)),))
    registry.register_gpu(entry)
    try:
        got = registry.choose("auto", seq_len=1024, head_dim=128, backend="gpu",
                              device_kind="TestGPU X1")
        assert got.reason.endswith("'test-gpu'") and got.block_sizes.block_q == 32
    finally:
        registry.GPU_TABLE.remove(entry)


# ------------------------------------------------------------------------ memory

def _temp_bytes(impl, s, h=4, d=32):
    q = jax.ShapeDtypeStruct((1, s, h, d), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, causal=True, impl=impl))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile(FAST_COMPILE)
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly():
    """4x the sequence: blockwise temp memory ~4x (linear), xla ~16x (quadratic)."""
    bw = [_temp_bytes("blockwise", s) for s in (2048, 8192)]
    xla = [_temp_bytes("xla", s) for s in (2048, 8192)]
    print(f"\ntemp bytes S=2048 -> 8192: blockwise {bw}, xla {xla}")
    assert bw[1] / bw[0] < 6
    assert xla[1] / xla[0] > 12
    assert bw[1] * 10 < xla[1]
