"""Kernel registry (issue #13): the measured kernel table (SPMD_LORA_KERNEL_TABLE), 'auto'
from measurements, cuDNN's packed-segment inputs and tokamax's segment key ranges.

Pure host-side logic, checked against numpy: no GPU needed.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from spmd_lora.kernels import BlockSizes, attention, cudnn, registry
from spmd_lora.kernels.tokamax_attention import segment_key_ranges

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"


def _choose(impl="auto", kind=H100, cc=(9, 0), **kw):
    kw.setdefault("seq_len", 8192)
    kw.setdefault("head_dim", 128)
    return registry.choose(impl, backend="gpu", device_kind=kind, compute_capability=cc, **kw)


def test_no_table_keeps_todays_rule(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.TABLE_ENV, raising=False)
    monkeypatch.setattr(registry, "PACKAGED_TABLE", str(tmp_path / "none.json"))
    got = _choose(dtype=jnp.bfloat16)
    assert got.impl == "pallas" and "Hopper" in got.reason


def test_packaged_table_is_the_default_and_the_env_var_wins(monkeypatch, tmp_path):
    packaged, user = tmp_path / "packaged.json", tmp_path / "user.json"
    registry.write_table(str(packaged), H100, ranking=["xla"])
    registry.write_table(str(user), H100, ranking=["blockwise"])
    monkeypatch.setattr(registry, "PACKAGED_TABLE", str(packaged))
    monkeypatch.delenv(registry.TABLE_ENV, raising=False)
    assert _choose(dtype=jnp.bfloat16).impl == "xla"
    monkeypatch.setenv(registry.TABLE_ENV, str(user))
    assert _choose(dtype=jnp.bfloat16).impl == "blockwise"


def test_table_round_trip_blocks_and_measured_auto(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    tuned = BlockSizes(64, 32, 32, 64, num_warps=4, num_stages=3)
    registry.write_table(str(path), H100, block_sizes=[(128, tuned)],
                         ranking=["cudnn", "pallas", "xla"], measurements={"note": "test"})
    registry.write_table(str(path), A100, ranking=["pallas"])   # merged, H100 kept
    data = json.loads(path.read_text())
    assert set(data["devices"]) == {H100, A100}
    monkeypatch.setenv(registry.TABLE_ENV, str(path))

    # pallas on H100: the measured blocks win over GPU_TABLE; not on A100 (no blocks there)
    assert _choose("pallas").block_sizes == tuned
    assert _choose("pallas", kind=A100, cc=(8, 0)).block_sizes != tuned
    assert _choose("pallas", head_dim=256).reason.startswith("GPU table")  # no 256 entry
    # auto: the fastest measured impl that takes the call
    assert _choose(dtype=jnp.bfloat16).impl == "cudnn"
    assert _choose(dtype=jnp.float32).impl == "pallas"              # cuDNN: fp16/bf16 only
    assert _choose(dtype=jnp.bfloat16, head_dim=96 + 4).impl == "pallas"   # hd % 8 != 0
    got = _choose(dtype=jnp.bfloat16, segments=True, seq_len=32768, cc=(8, 0))
    assert got.impl == "pallas"                                      # dense mask refused
    if cudnn.has_packed_api():
        assert _choose(dtype=jnp.bfloat16, segments=True, seq_len=32768).impl == "cudnn"
    assert "measured ranking" in _choose(dtype=jnp.bfloat16).reason
    # an explicit impl is never overridden
    assert _choose("xla", dtype=jnp.bfloat16).impl == "xla"


@pytest.mark.parametrize("content, field", [
    ("not json", "not valid JSON"),
    (json.dumps({"devices": {}}), "format"),
    (json.dumps({"format": registry.TABLE_FORMAT, "devices": {H100: {"ranking": ["flash"]}}}),
     "ranking"),
    (json.dumps({"format": registry.TABLE_FORMAT,
                 "devices": {H100: {"block_sizes": [[128, {"block_q": 48}]]}}}),
     "block_sizes"),
])
def test_bad_table_is_a_clear_error(tmp_path, monkeypatch, content, field):
    path = tmp_path / "t.json"
    path.write_text(content)
    monkeypatch.setenv(registry.TABLE_ENV, str(path))
    with pytest.raises(ValueError, match=f"kernel table .*t.json.*{registry.TABLE_ENV}.*{field}"):
        _choose()
    monkeypatch.setenv(registry.TABLE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="cannot read"):
        _choose()


def _runs(seg_row):
    """numpy oracle: (start, length) of each run of equal ids."""
    out, start = [], 0
    for i in range(1, len(seg_row) + 1):
        if i == len(seg_row) or seg_row[i] != seg_row[start]:
            out.append((start, i - start))
            start = i
    return out


def test_cudnn_packed_offsets_match_numpy():
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3],
                    [5, 5, 5, 5, 5, 5, 5, 5, 5, 5],
                    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], np.int32)
    offsets, lengths, count = (np.asarray(x) for x in cudnn.packed_offsets(jnp.asarray(seg), 4))
    assert offsets.shape == (3, 5) and lengths.shape == (3, 4)
    for r in range(3):
        runs = _runs(seg[r])
        assert count[r] == len(runs)
        m = min(len(runs), 4)
        assert offsets[r, :m].tolist() == [s for s, _ in runs[:m]]
        assert lengths[r, :m].tolist() == [n for _, n in runs[:m]]
        assert (offsets[r, len(runs):] == -1).all() and (lengths[r, len(runs):] == -1).all()


def test_cudnn_segment_mode():
    assert cudnn.segment_mode(4096, (8, 0)) == "dense"
    with pytest.raises(ValueError, match=r"S=8192.*dense \[B, 1, S, S\] mask is refused.*"
                                         r"impl='pallas'"):
        cudnn.segment_mode(8192, (8, 0))
    if cudnn.has_packed_api():
        assert cudnn.segment_mode(32768, (9, 0)) == "packed"


def test_tokamax_key_ranges_give_the_segment_mask():
    seg = np.array([[0, 0, 1, 1, 1, 2, 7, 7], [3, 3, 3, 3, 3, 3, 3, 3]], np.int32)
    start, end = (np.asarray(x) for x in segment_key_ranges(jnp.asarray(seg)))
    k = np.arange(seg.shape[1])
    for causal in (False, True):
        ranges = (k[None, None, :] >= start[:, :, None]) & (k[None, None, :] < end[:, :, None])
        want = seg[:, :, None] == seg[:, None, :]
        if causal:
            ranges &= k[None, None, :] <= k[None, :, None]
            want &= np.tril(np.ones((8, 8), bool))[None]
        assert (ranges == want).all()


def test_gpu_only_impls_refuse_cpu():
    q = jnp.zeros((1, 16, 2, 16))
    for impl in ("cudnn", "tokamax"):
        with pytest.raises(ValueError, match=f"'{impl}' needs a CUDA GPU"):
            attention(q, q, q, impl=impl)


def test_tokamax_path_matches_reference_through_its_xla_impl():
    """Our tokamax call (key-range Mask, GQA, scale) through tokamax's portable 'xla'
    implementation: forward and gradients match the oracle. Runs where tokamax is installed
    (Python >= 3.12 with the extra); the Mosaic GPU implementation is checked by the suite."""
    pytest.importorskip("tokamax")
    import jax

    from spmd_lora.kernels import reference_attention
    from spmd_lora.kernels.tokamax_attention import tokamax_attention
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (2, 40, 4, 16))
    k, v = (jax.random.normal(kk, (2, 40, 2, 16)) for kk in ks[1:])
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [10, 20, 10]),
                                np.repeat([3, 4], [25, 15])]).astype(np.int32))
    for causal in (True, False):
        mine = lambda q, k, v: tokamax_attention(q, k, v, causal=causal, segment_ids=seg,  # noqa
                                                 implementation="xla")
        ref = lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg)  # noqa
        got = (mine(q, k, v), *jax.grad(lambda *a: jnp.sum(mine(*a) ** 2), (0, 1, 2))(q, k, v))
        want = (ref(q, k, v), *jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), (0, 1, 2))(q, k, v))
        for a, b in zip(got, want):
            assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5
