"""The early stop, in one plain process: a periodic evaluation that reaches the target stops the
run only when the final evaluation reaches it too (evaluations scripted, training real)."""

from __future__ import annotations

import pytest

from mpirl import config, greedy_eval, trainer


@pytest.fixture
def scripted_evals(monkeypatch):
    """Replace the evaluation by a script of means, consumed in order; record each call's name."""
    calls: list[tuple[str, float]] = []

    def use(means: list[float]) -> list[tuple[str, float]]:
        script = iter(means)

        def fake(run, episodes, seed_base, name):
            mean = next(script)
            calls.append((name, mean))
            return mean, 1.0, mean - 2.0

        monkeypatch.setattr(greedy_eval, "evaluate_global", fake)
        return calls

    return use


def _fit(tmp_path, *extra: str) -> trainer.Summary:
    cfg = config.parse_args(["--env", "CartPole-v1", "--total-env-steps", "4000", "--eval-interval", "1000",
                             "--learning-starts-per-rank", "200", "--final-eval-episodes", "5", "--checkpoint-interval",
                             "0", "--no-tensorboard", "--run-dir", str(tmp_path / "run"), *extra])  # fmt: skip
    return trainer.fit(cfg)


def test_a_lucky_periodic_evaluation_does_not_stop_a_run_the_final_one_would_not_pass(tmp_path, scripted_evals, capsys):
    # 1,000 steps: 480 reaches 475, the final check gives 457: go on. 2,000: 490, then 480: stop.
    calls = scripted_evals([480.0, 457.0, 490.0, 480.0])
    summary = _fit(tmp_path)
    out = capsys.readouterr().out
    assert "the final evaluation gave 457.0 over 5 episodes; training goes on" in out
    assert [name for name, _ in calls] == ["mpirl.eval", "mpirl.final_eval", "mpirl.eval", "mpirl.final_eval"]
    # The summary reuses the check (same weights, same seeds): no fifth evaluation.
    assert summary.stopped_early and summary.solved and summary.final_eval_mean == 480.0
    assert summary.global_env_steps == 2000


def test_without_a_final_evaluation_the_periodic_one_stops_the_run(tmp_path, scripted_evals):
    calls = scripted_evals([480.0])
    summary = _fit(tmp_path, "--final-eval-episodes", "0")
    assert calls == [("mpirl.eval", 480.0)] and summary.stopped_early and summary.global_env_steps == 1000


def test_a_run_that_never_confirms_trains_its_whole_budget(tmp_path, scripted_evals):
    calls = scripted_evals([480.0, 400.0] * 4 + [470.0])
    summary = _fit(tmp_path)
    assert not summary.stopped_early and not summary.solved and summary.global_env_steps == 4000
    assert len(calls) == 9 and calls[-1] == ("mpirl.final_eval", 470.0)
