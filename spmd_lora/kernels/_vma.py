"""Helpers for calling kernels inside ``jax.shard_map(..., check_vma=True)``.

Inside a shard_map with ``check_vma=True`` every value carries the set of manual mesh axes it
varies over ("vma"). Two things break there:

* loop carries (``lax.scan`` / ``fori_loop``) initialised from constants (``jnp.zeros``) are
  *invarying* while the body makes them *varying*: the carry types differ. Fix: cast the
  initial values with :func:`pvary`.
* ``pallas_call`` in interpret mode (CPU) is evaluated at *lowering* time against the varying
  input types, and its internal constants are invarying: "Primitive mul requires varying manual
  axes to match". Fix: :func:`call_unchecked` runs the kernel in a nested shard_map over no new
  axes with ``check_vma=False`` on inputs whose vma has been stripped, and re-marks the outputs
  as varying. This is done inside a ``custom_vjp`` (forward and backward rules), whose bodies
  are never transposed, so the "invarying -> varying" cast never turns into a psum.

The vma field moved between JAX versions (``aval.vma`` up to 0.9, ``aval.mat.varying`` in
0.10); :func:`varying_axes` reads either.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def varying_axes(x) -> frozenset:
    """Manual mesh axes ``x`` varies over (empty outside shard_map or with check_vma=False)."""
    if x is None:
        return frozenset()
    try:
        aval = jax.typeof(x)
    except Exception:  # noqa: BLE001 - not a jax value
        return frozenset()
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())


def union_axes(*xs) -> frozenset:
    out = frozenset()
    for x in xs:
        out |= varying_axes(x)
    return out


def pvary(x, axes):
    """Cast ``x`` to vary over ``axes`` (a no-op for axes it already varies over)."""
    if x is None or not axes:
        return x
    missing = tuple(sorted(set(axes) - varying_axes(x)))
    if not missing:
        return x
    return jax.lax.pcast(x, missing, to="varying")


def zeros(shape, dtype, axes):
    """``jnp.zeros`` typed as varying over ``axes`` (for loop-carry initial values)."""
    return pvary(jnp.zeros(shape, dtype), axes)


def full(shape, value, dtype, axes):
    return pvary(jnp.full(shape, value, dtype), axes)


def _in_manual_region() -> bool:
    """Whether the code being traced runs inside ``jax.shard_map`` (some mesh axis manual)."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def call_unchecked(fn, args, axes):
    """Run ``fn(*args)`` with vma checking off and mark its outputs varying over ``axes``.

    ``args`` is a tuple of arrays or ``None``; ``fn`` returns a tuple of arrays. Outside
    shard_map this is just ``fn(*args)``. Inside one it always runs unchecked, also when no
    argument varies: a compiled (not interpreted) ``pallas_call`` refuses output shapes
    without a vma under ``check_vma=True``.
    """
    if not axes and not _in_manual_region():
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]

    def body(*xs):
        full_args = list(args)
        for i, x in zip(present, xs):
            # An op traced with check_vma=False drops the vma, so the interpreted kernel is
            # lowered against invarying types throughout.
            full_args[i] = x * jnp.ones((), x.dtype) if varying_axes(x) else x
        return tuple(fn(*full_args))

    inner = jax.shard_map(body, in_specs=tuple(P() for _ in present), out_specs=P(),
                          axis_names=set(), check_vma=False)
    outs = inner(*[args[i] for i in present])
    return tuple(pvary(o, axes) for o in outs)
