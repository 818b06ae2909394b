"""mpirl.plot: learning curves from run directories; one-line errors with exit 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mpirl import plot


def _write_run(path, evals, trains=(), target=475.0, extra_lines=()):
    """A run directory with metrics.jsonl records as mpirl.train writes them."""
    path.mkdir(parents=True)
    lines = []
    for steps, ret in trains:
        lines.append({"kind": "train", "global_env_steps": steps, "wall_time_s": steps / 1000, "mean_return": ret})
    for steps, ret in evals:
        lines.append({"kind": "eval", "global_env_steps": steps, "wall_time_s": steps / 1000, "eval_mean_return": ret})
    lines.sort(key=lambda r: r["global_env_steps"])
    lines.append({"kind": "final", "env_id": "CartPole-v1", "target_return": target})
    text = "".join(json.dumps(r) + "\n" for r in lines) + "".join(extra_lines)
    (path / "metrics.jsonl").write_text(text)
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(tmp_path / "CartPole-v1-s1-20250101-120000", [(1000, 20.0), (2000, 150.0), (3000, 480.0)],
                   trains=[(500, float("nan")), (1500, 30.0), (2500, 90.0)])  # fmt: skip
    b = _write_run(tmp_path / "CartPole-v1-s2-20250101-120500", [(1000, 25.0), (2000, 300.0)],
                   trains=[(1500, 40.0)], extra_lines=['{"kind": "eval", "glob'])  # killed mid-write  # fmt: skip
    return a, b


def test_plots_two_runs_as_one_label_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert plot.main([str(p) for p in two_runs] + ["--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    runs = plot.find_runs([str(p) for p in two_runs], None, "env_steps")
    assert {r.label for r in runs} == {"CartPole-v1"}  # seed and time stamp stripped: one group
    assert runs[1].eval_x == [1000.0, 2000.0]  # the partial last line is ignored
    assert runs[0].train_y == [30.0, 90.0]  # NaN (no episode finished yet) is left out


def test_labels_wall_time_and_directory_of_runs(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    sb3 = tmp_path / "sb3"  # a directory of run directories (e.g. the benchmark's SB3 runs)
    _write_run(sb3 / "seed1", [(1000, 10.0), (2000, 200.0)])
    _write_run(sb3 / "seed2", [(1000, 12.0), (2500, 480.0)])
    out = tmp_path / "wall.png"
    argv = [str(two_runs[0]), str(two_runs[1]), str(sb3), "--x", "wall_time", "--out", str(out),
            "--label", "mpirl", "mpirl", "SB3 DQN"]  # fmt: skip
    assert plot.main(argv) == 0
    assert out.stat().st_size > 5000
    runs = plot.find_runs(argv[:3], ["mpirl", "mpirl", "SB3 DQN"], "wall_time")
    assert [r.label for r in runs] == ["mpirl", "mpirl", "SB3 DQN", "SB3 DQN"]
    assert runs[2].eval_x == [1.0, 2.0]  # seconds


def test_cli_as_a_user_runs_it(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cli.png"
    res = subprocess.run([sys.executable, "-m", "mpirl.plot", str(two_runs[0]), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "mpirl: wrote" in res.stdout and out.stat().st_size > 0


def test_band_median_min_max_hold_last_value():
    x, med, lo, hi = plot.band([([0, 10], [0.0, 10.0]), ([0, 20], [0.0, 40.0]), ([10, 20], [5.0, 5.0])])
    assert list(x) == [0, 10, 20]
    # x=0: third run absent; x=10: 10, 20, 5; x=20: first holds 10, 40, 5
    np.testing.assert_allclose(med, [0.0, 10.0, 10.0])
    np.testing.assert_allclose(lo, [0.0, 5.0, 5.0])
    np.testing.assert_allclose(hi, [0.0, 20.0, 40.0])


def test_resumed_run_supersedes_redone_records(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    recs = [("eval", 1000, 1.0, 10.0), ("eval", 2000, 2.0, 20.0), ("eval", 3000, 3.0, 30.0),
            ("eval", 2000, 0.5, 21.0), ("eval", 3000, 1.5, 31.0)]  # resumed from the 1500-step checkpoint  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": k, "global_env_steps": s, "wall_time_s": w, "eval_mean_return": y}) + "\n"
        for k, s, w, y in recs))  # fmt: skip
    r = plot.load_run(str(run), "r", "env_steps")
    assert r.eval_x == [1000.0, 2000.0, 3000.0] and r.eval_y == [10.0, 21.0, 31.0]
    w = plot.load_run(str(run), "r", "wall_time")
    assert w.eval_x == [1.0, 3.5, 4.5]  # the resumed process's clock continues the old one


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda t: [str(t / "missing")], "no such directory"),
        (lambda t: [str((t / "empty-dir").mkdir() or t / "empty-dir")], "no metrics.jsonl in it"),
        (lambda t: [str(_write_run(t / "blank", []))], "holds no evaluation or training records"),
        (lambda t: [str(_write_run(t / "a", [(1, 1.0)])), "--label", "x", "y"], "--label got 2 label(s)"),
        (lambda t: [str(_write_run(t / "a", [(1, 1.0)])), "--x", "episodes"], "argument --x: invalid choice"),
        (lambda t: [], "the following arguments are required: RUN_DIR"),
    ],
    ids=["missing", "no-metrics", "empty", "label-count", "bad-x", "no-args"],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, make, fragment):
    assert plot.main([*make(tmp_path), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpirl: error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "o.png").exists()


def test_corrupt_line_in_the_middle(tmp_path, capsys):
    run = _write_run(tmp_path / "r", [(1, 1.0)])
    (run / "metrics.jsonl").write_text("not json\n" + (run / "metrics.jsonl").read_text())
    assert plot.main([str(run)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot.main([str(two_runs[0]), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mpirl[plot]" in err
