"""bench/skinny_matmul.py runs both libraries on every decode shape and sums a step floor from them (no timing
is asserted: speed belongs in the benchmark's own output)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import skinny_matmul  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_skinny_matmul_bench_reports_every_shape(tmp_path, dtype):
    out = tmp_path / "skinny.json"
    result = skinny_matmul.main(["--dtype", dtype, "--rounds", "1", "--reps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["k"], r["n"]) for r in result["rows"]] == [(k, n) for k, n, *_ in skinny_matmul.SHAPES]
    sides = {"jax", "torch"} | ({"numpy"} if dtype == "float32" else set())
    for row in result["rows"]:
        assert set(row["ms"]) == sides and all(v > 0 for v in row["ms"].values())
    uses = {(k, n): u for k, n, u, _ in skinny_matmul.SHAPES}
    assert [r["weight_stored_nk"] for r in result["rows"]] == [nk for *_, nk in skinny_matmul.SHAPES]
    expected = sum(uses[(r["k"], r["n"])] * r["ms"]["jax"] for r in result["rows"])
    assert result["step_matmul_ms"]["jax"] == pytest.approx(expected)
    assert result["step_matmul_ms"]["best"] <= min(result["step_matmul_ms"][s] for s in sides) + 1e-9
