"""The HLO census reads both replica-group syntaxes (issue #13).

``tests/data/hlo_*_jax<version>.txt`` are compiled programs (``compiled.as_text()``) captured
from jax 0.10.2 and 0.12.0.1 on 8 fake CPU devices: a shard_map over a (dp=4, tp=2) mesh doing
psum over tp, dp and both, an all-gather and a ppermute over tp; and one over a 3-axis mesh
(a=2, b=2, c=2) built from a permuted device list doing psum over b and over (a, c), a
reduce-scatter over c and an all-to-all over a. jaxlib 0.10 prints explicit groups
``{{0,1},{2,3},...}``; 0.12 prints ``replica_groups=mesh['dp'=4,'tp'=2] {'tp'}``. The census
of the two captures must agree row for row.
"""
from pathlib import Path

import pytest

from spmd_lora.analysis import hlo

DATA = Path(__file__).parent / "data"
CASES = {
    "dp4_tp2": ({"dp": 4, "tp": 2},
                {("all-reduce", "tp", 2), ("all-reduce", "dp", 4), ("all-reduce", "dp+tp", 8),
                 ("all-gather", "tp", 2), ("collective-permute", "tp", 2)}),
    "a2_b2_c2": ({"a": 2, "b": 2, "c": 2},
                 {("all-reduce", "b", 2), ("all-reduce", "a+c", 4), ("reduce-scatter", "c", 2),
                  ("all-to-all", "a", 2)}),
}


def _rows(case, version):
    mesh, _ = CASES[case]
    text = (DATA / f"hlo_{case}_jax{version}.txt").read_text()
    return sorted((r["kind"], r["axis"], r["group_size"], r["count"], tuple(r["shapes"]))
                  for r in hlo.collective_census(text, mesh))


@pytest.mark.parametrize("case", list(CASES))
def test_census_same_on_both_syntaxes(case):
    old, new = _rows(case, "0.10.2"), _rows(case, "0.12.0.1")
    assert "mesh[" in (DATA / f"hlo_{case}_jax0.12.0.1.txt").read_text()
    assert "replica_groups={{" in (DATA / f"hlo_{case}_jax0.10.2.txt").read_text()
    assert old == new
    assert {(k, a, n) for k, a, n, _, _ in new} == CASES[case][1]


def test_parse_groups_syntaxes():
    explicit = hlo._parse_groups("{{0,2,4,6},{1,3,5,7}}")
    assert hlo._parse_groups("[2,4]<=[4,2]T(1,0)") == explicit
    assert hlo._parse_groups("mesh['dp'=4,'tp'=2] {'dp'}") == explicit
    assert hlo._parse_groups("mesh['dp'=4,'tp'=2] {'tp'}") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert hlo._parse_groups("mesh['dp'=4,'tp'=2] {'dp','tp'}") == [list(range(8))]
    # sub-axis: axis x (size 8) split as (pre 2)(size 2)(rest 2); groups vary the middle part
    assert hlo._parse_groups("mesh['x'=8] {'x':(2)2}") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert hlo.axis_of_groups(hlo._parse_groups("mesh['dp'=4,'tp'=2] {'tp'}"),
                              {"dp": 4, "tp": 2}) == "tp"
    with pytest.raises(ValueError, match="not in the mesh"):
        hlo._parse_groups("mesh['dp'=4,'tp'=2] {'cp'}")
