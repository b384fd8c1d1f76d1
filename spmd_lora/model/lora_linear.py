"""The tensor-parallel linears with LoRA (Megatron-style, per device, over the ``tp`` axis).

* :func:`column_linear`: local output columns [in, out_l], no collective; LoRA's ``b`` read at
  this device's columns.
* :func:`row_linear`: local input rows [in_l, out]; returns this device's PARTIAL sum, which
  the caller reduces over tp (psum, or psum_scatter with sequence parallelism), LoRA's rank-r
  term folded into that one reduction.

LoRA's ``x @ a @ b * scaling`` has a hand-written VJP (:func:`_lora_product`), and its input
dropout (:mod:`.dropout`) draws layout-independent masks. :func:`like_vma` types a
hand-written cotangent like its primal under ``check_vma`` (also used by the loss).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import dropout as lora_dropout
from ..kernels import _vma
from ..parallel.mesh import TP
from ..weights.quant import matmul
from .dropout import Dropout
from .options import ForwardOptions


def _lora_delta(x, lora, b_cols, opts: ForwardOptions, drop: Dropout | None, cols):
    """dropout(x) [.., in] @ a [in, r] @ b_cols [r, out_l] * scaling, in x.dtype. ``cols`` are
    the global input-feature ids of x's columns (for the layout-independent dropout mask)."""
    x = lora_dropout.apply(x, drop, cols, opts.lora.dropout)
    return _lora_product(x, lora["a"].astype(x.dtype), b_cols.astype(x.dtype), opts.lora.scaling)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_product(x, a, b, scaling: float):
    """(x [.., in] @ a [in, r]) @ b [r, out] * scaling. Its backward is written out so that
    both weight gradients contract over the tokens with the rank-r factor on the left
    (``dh^T x``, ``h^T g``): autodiff's ``x^T dh`` puts the [tokens, in] activation on the left,
    and XLA:CPU then copies it into a transposed layout (per layer, inside the layer scan)."""
    return ((x @ a) @ b) * jnp.asarray(scaling, x.dtype)


def _lora_product_fwd(x, a, b, scaling):
    h = x @ a                                                                # [.., r]
    return (h @ b) * jnp.asarray(scaling, x.dtype), (x, a, b, h)


def _lora_product_bwd(scaling, res, g):
    x, a, b, h = res
    g = g * jnp.asarray(scaling, g.dtype)                                    # [.., out]
    dh = g @ b.T                                                             # [.., r]
    tokens = (((0,), (0,)), ((), ()))
    flat = lambda v: v.reshape(-1, v.shape[-1])                              # noqa: E731
    db = jax.lax.dot_general(flat(h), flat(g), tokens)                       # [r, out]
    da = jax.lax.dot_general(flat(dh), flat(x), tokens).T                    # [in, r]
    dx = dh @ a.T
    return like_vma(dx, x), like_vma(da, a), like_vma(db, b)


_lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


def like_vma(ct, primal):
    """The cotangent ``ct`` typed like ``primal`` under check_vma: summed over the mesh axes
    only it varies over (what autodiff's transpose of the implicit ``pcast`` does), and cast to
    vary over the axes only ``primal`` varies over."""
    axes = _vma.varying_axes(primal)
    extra = tuple(sorted(_vma.varying_axes(ct) - axes))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return _vma.pvary(ct, axes)


def column_linear(x, w, lora, unit, opts: ForwardOptions, drop: Dropout | None = None):
    """Column-parallel projection. x [B, S, in] (the same on every tp device); w [in, out_l]
    local columns. ``unit`` = (units_total, unit_size) of the GLOBAL LoRA output (heads and head
    dim, or F and 1): this device's slice of b starts at unit ``axis_index(tp) * units_total //
    tp`` (so with tp > KV, the devices sharing a kv head read the same columns of b).
    Returns [B, S, out_l]; no collective."""
    y = matmul(x, w)
    if lora is not None:
        units, size = unit
        width = y.shape[-1]
        start = (jax.lax.axis_index(TP) * units // opts.tp) * size
        b_local = jax.lax.dynamic_slice_in_dim(lora["b"], start, width, axis=1)
        cols = jnp.arange(x.shape[-1], dtype=jnp.int32)
        y = y + _lora_delta(x, lora, b_local, opts, drop, cols)
    return y


def row_linear(x, w, lora, opts: ForwardOptions, drop: Dropout | None = None):
    """Row-parallel projection. x [B, S, in_l] (local slice of the input features); w
    [in_l, out] local rows. LoRA uses the local rows of a. Returns this device's PARTIAL sum
    [B, S, out] (the caller reduces it over tp: psum or psum_scatter), so LoRA's rank-r term
    rides in the same single reduction."""
    y = matmul(x, w)
    if lora is not None:
        in_l = x.shape[-1]
        start = jax.lax.axis_index(TP) * in_l
        a_local = jax.lax.dynamic_slice_in_dim(lora["a"], start, in_l, axis=0)
        cols = start + jnp.arange(in_l, dtype=jnp.int32)
        y = y + _lora_delta(x, {"a": a_local}, lora["b"], opts, drop, cols)
    return y
