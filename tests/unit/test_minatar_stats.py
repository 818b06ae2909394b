"""benchmarks/minatar.py's rank-sum test, which decides whether a return gap between mpirl and
SB3 over a few seeds is more than seed noise."""

import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "minatar.py")


@pytest.fixture(scope="module")
def bench():
    # Loaded under another name: "minatar" is the game package's.
    spec = importlib.util.spec_from_file_location("minatar_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_sum_p_is_the_exact_two_sided_mann_whitney_p(bench):
    assert bench.rank_sum_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)  # 2 of C(6,3) = 20 splits
    assert bench.rank_sum_p([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(0.1)
    assert bench.rank_sum_p([1.0, 2.0], [1.0, 2.0]) == 1.0
    # The Breakout returns of BENCHMARKS.md (6 seeds each); scipy's exact test gives 0.3095.
    sb3 = [8.0667, 9.4, 5.9333, 7.0667, 8.3, 8.5333]
    mpirl = [7.2333, 8.1333, 6.8333, 6.9333, 7.5, 7.5333]
    assert bench.rank_sum_p(mpirl, sb3) == pytest.approx(0.3095, abs=1e-4)


def test_rank_sum_p_keeps_ties_as_midranks(bench):
    # All values equal: every split is as extreme as the observed one.
    assert bench.rank_sum_p([3.0, 3.0], [3.0, 3.0, 3.0]) == 1.0
    # A tie across the groups: midranks 1, 2.5 | 2.5, 4; rank sum 3.5 against 5 expected. Of the 6
    # splits of {1, 2.5, 2.5, 4} into two, 4 lie as far from 5 (3.5 twice, 6.5 twice).
    assert bench.rank_sum_p([1.0, 2.0], [2.0, 4.0]) == pytest.approx(4 / 6)


def test_summarise_reports_p_only_against_sb3(bench):
    row = lambda seed, ret: {"seed": seed, "final_eval_mean": ret, "total_wall_s": 10.0}  # noqa: E731
    rows = {"MinAtar/Breakout-v1": {"sb3": [row(1, 1.0), row(2, 2.0), row(3, 3.0)],
                                    "mpirl-2": [row(1, 4.0), row(2, 5.0), row(3, 6.0)]}}  # fmt: skip
    by_variant = {r["variant"]: r for r in bench.summarise(rows)}
    assert by_variant["sb3"]["p_vs_sb3"] is None
    assert by_variant["mpirl-2"]["p_vs_sb3"] == pytest.approx(0.1)
