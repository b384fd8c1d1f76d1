"""Every attention impl under ``jax_enable_x64`` (issue #13): forward and dq/dk/dv match the
fp32 XLA oracle computed with x64 off.

With x64 on, Python ints become int64 when they meet traced int32 indices; ``lax`` ops that
need equal dtypes (``lax.div``) then raise, so the kernels' index arithmetic must be int32
throughout. Small shapes with every masking branch: causal, GQA 4:1, packed segments, a length
that is not a multiple of the blocks (padded keys).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lora.kernels import BlockSizes, attention, reference_attention

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(b=1, s=72, h=4, kv=1, d=16):
    ks = jax.random.split(jax.random.PRNGKey(7), 4)
    q = np.asarray(jax.random.normal(ks[0], (b, s, h, d), jnp.float32))
    k = np.asarray(jax.random.normal(ks[1], (b, s, kv, d), jnp.float32))
    v = np.asarray(jax.random.normal(ks[2], (b, s, kv, d), jnp.float32))
    ct = np.asarray(jax.random.normal(ks[3], (b, s, h, d), jnp.float32))
    seg = (np.arange(s)[None, :] >= s // 3).astype(np.int32) + (np.arange(s) >= s // 2)
    return q, k, v, ct, seg.astype(np.int32)


def _fwd_bwd(fn, q, k, v, ct):
    def f(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    out, grads = jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, ct)
    return [np.asarray(x, np.float64) for x in (out, *grads)]


IMPLS = {
    "xla": None,
    "blockwise": BlockSizes(32, 32, 32, 32),
    "pallas": BlockSizes(32, 16, 16, 32),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_under_x64(impl, causal):
    q, k, v, ct, seg = _inputs()
    ref = _fwd_bwd(lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg),
                   q, k, v, ct)
    with jax.enable_x64(True):
        assert jnp.asarray(1).dtype == jnp.int64  # x64 really is on
        segj = jnp.asarray(seg)  # int32 segment ids; the kernels must not mix in int64
        got = _fwd_bwd(lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=segj,
                                                 impl=impl, block_sizes=IMPLS[impl]),
                       jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(ct))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= 2e-5, (impl, name, err)
