"""Agreement report: Krippendorff's alpha against the published worked example and a brute-force pair count,
per-rater distributions against NumPy, and the `report` command."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from therapy_rl.rate import agreement, store as store_lib

NAN = np.nan
# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", reliability data with missing values:
# 4 observers x 12 units; published alpha: interval 0.849, nominal 0.743.
KRIPPENDORFF_EXAMPLE = np.asarray([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
])


def brute_force_alpha(units, delta):
    """alpha = 1 - D_o / D_e with every ordered pair of values enumerated (the textbook definition)."""
    pairable = [list(u) for u in units if len(u) >= 2]
    n = sum(len(u) for u in pairable)
    observed = sum(sum(delta(a, b) for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in pairable) / n
    values = [v for u in pairable for v in u]
    expected = sum(delta(a, b) for a, b in itertools.permutations(values, 2)) / (n * (n - 1))
    return 1 - observed / expected


def test_published_example():
    units = agreement.units_from_matrix(KRIPPENDORFF_EXAMPLE)
    assert agreement.krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)
    assert agreement.krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_pairs(seed):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 1, size=25)
    matrix = np.clip(truth[None, :] + rng.normal(0, 0.2, size=(4, 25)), 0, 1)
    matrix[rng.uniform(size=matrix.shape) < 0.3] = NAN  # missing ratings
    units = agreement.units_from_matrix(matrix)
    expected = brute_force_alpha(units, lambda a, b: (a - b) ** 2)
    assert agreement.krippendorff_alpha(units, "interval") == pytest.approx(expected, rel=1e-10)
    rounded = [[round(v * 4) / 4 for v in u] for u in units]
    assert agreement.krippendorff_alpha(rounded, "nominal") == pytest.approx(
        brute_force_alpha(rounded, lambda a, b: float(a != b)), rel=1e-10)


def test_edge_cases():
    assert agreement.krippendorff_alpha([[0.5], [0.2]]) != agreement.krippendorff_alpha([[0.5], [0.2]])  # nan
    assert agreement.krippendorff_alpha([[0.3, 0.3], [0.3, 0.3]]) != 0.0  # nan: no expected disagreement
    assert agreement.krippendorff_alpha([[0.0, 0.0], [1.0, 1.0]]) == pytest.approx(1.0)
    assert agreement.krippendorff_alpha([[0.0, 1.0], [1.0, 0.0]]) < 0


def test_rater_summary_matches_numpy():
    scores = [0.1, 0.5, 0.5, 0.9, 1.0, 0.35]
    summary = agreement.summarise_rater("a", scores, [False, True, False, False, True, False],
                                        [{"empathy": True}, {"empathy": False}, {"empathy": True}] * 2)
    s = np.asarray(scores)
    assert summary.count == 6 and summary.unsafe == 2
    assert summary.mean == pytest.approx(s.mean()) and summary.std == pytest.approx(s.std(ddof=1))
    assert (summary.minimum, summary.q25, summary.median, summary.q75, summary.maximum) == pytest.approx(
        tuple(np.quantile(s, [0, 0.25, 0.5, 0.75, 1])))
    assert summary.histogram == (1, 1, 2, 0, 2)  # 1.0 falls in the last bin
    assert summary.rubric_rates == {"empathy": pytest.approx(4 / 6)}


def test_report_command(tmp_path):
    store = store_lib.RatingStore.in_workdir(str(tmp_path))
    for name in ("ann", "ben", "cy"):
        store.add_rater(name)
    raters = store.raters()
    batch = store.queue_batch("r", 0, 0, 3, [store_lib.NewSample(i, "p", "u", "sadness", f"reply {i}", None, (i,))
                                             for i in range(12)])
    samples = store.samples(batch.id)
    matrix = KRIPPENDORFF_EXAMPLE[:3] / 5.0  # scores in [0, 1]; interval alpha is scale-free
    for r, rater in enumerate(raters):
        for u, sample in enumerate(samples):
            if np.isfinite(matrix[r, u]):
                store.add_rating(rater, sample.id, float(matrix[r, u]), unsafe=bool(u == 5 and r == 0))
    out = subprocess.run([sys.executable, "-m", "therapy_rl.rate", "report", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = agreement.krippendorff_alpha(agreement.units_from_matrix(matrix))
    assert f"Krippendorff's alpha (interval): {expected:.3f}" in out.stdout
    report = json.loads((tmp_path / "rating_report.json").read_text())
    assert report["krippendorff_alpha_interval"] == pytest.approx(expected)
    assert [r["name"] for r in report["raters"]] == ["ann", "ben", "cy"]
    assert report["raters"][0]["count"] == 9 and report["raters"][0]["unsafe"] == 1
    print(out.stdout)
