"""Config: defaults, TOML + flag precedence, validation messages, --help coverage."""

import dataclasses
import re

import pytest

from mpirl import jobcheck
from mpirl.config import Config, ConfigError, build_parser, parse_args


def test_defaults_are_valid():
    cfg = parse_args([])
    assert cfg == Config()
    assert cfg.env_id == "CartPole-v1" and cfg.num_envs_per_rank > 1


def test_flags_and_types():
    cfg = parse_args(
        [
            "--env",
            "Acrobot-v1",
            "--seed",
            "7",
            "--hidden-sizes",
            "64,32",
            "--lr",
            "3e-4",
            "--no-double-dqn",
            "--dueling",
            "--total-env-steps",
            "1_000",
            "--target-return",
            "auto",
            "--no-early-stop",
        ]
    )
    assert cfg.env_id == "Acrobot-v1" and cfg.seed == 7 and cfg.hidden_sizes == (64, 32)
    assert cfg.lr == pytest.approx(3e-4) and cfg.double_dqn is False and cfg.dueling is True
    assert cfg.total_env_steps == 1000 and cfg.target_return is None and cfg.early_stop is False
    assert parse_args(["--target-return", "195.5"]).target_return == 195.5


def test_toml_then_flags_override(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(
        'env = "Acrobot-v1"\nseed = 3\nbatch-size-per-rank = 32\nhidden_sizes = [16, 16]\n[train]\nlr = 0.01\n'
    )
    cfg = parse_args(["--config", str(p), "--seed", "9"])
    assert cfg.env_id == "Acrobot-v1" and cfg.seed == 9 and cfg.batch_size_per_rank == 32
    assert cfg.hidden_sizes == (16, 16) and cfg.lr == pytest.approx(0.01)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--num-envs-per-rank", "0"], "--num-envs-per-rank must be positive"),
        (["--batch-size-per-rank", "-4"], "--batch-size-per-rank must be positive"),
        (["--seed", "abc"], "--seed must be an integer"),
        (["--lr", "fast"], "--lr must be a number"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--per-alpha", "2"], "--per-alpha must be in [0, 1]"),
        (["--n-step", "0"], "--n-step must be positive"),
        (["--buffer-size-per-rank", "10"], "is smaller than --batch-size-per-rank"),
        (["--learning-starts-per-rank", "8"], "is below --batch-size-per-rank"),
        (["--lr-scaling", "cubic"], "--lr-scaling must be one of"),
        (["--precision", "fp16"], "--precision must be one of fp32, bf16, got 'fp16'"),
        (["--dueling", "maybe"], "--dueling must be a boolean"),
        (["--hidden-sizes", "64,0"], "--hidden-sizes must be positive"),
        (["--tau", "0"], "--tau must be in (0, 1]"),
        (["--sync-every", "0"], "--sync-every must be positive"),
        (["--sync-every", "-4"], "--sync-every must be positive"),
        (["--sync-every", "2.5"], "--sync-every must be an integer"),
        (["--sync-every", "4", "--fp16-allreduce"], "--fp16-allreduce compresses gradients"),
    ],
)
def test_bad_flags_one_line_errors(argv, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_args(argv)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="malformed TOML"):
        parse_args(["--config", str(p)])
    p.write_text("nonsense_option = 3\n")
    with pytest.raises(ConfigError, match="unknown option 'nonsense_option'"):
        parse_args(["--config", str(p)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "missing.toml")])


def test_help_documents_every_option_with_default():
    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        assert flag in text, flag
    assert text.count("(default:") >= len(dataclasses.fields(Config))


def test_derived_values():
    cfg = Config(lr=1e-3, lr_scaling="linear", batch_size_per_rank=32, backward_passes_per_step=2)
    assert cfg.lr_for(4) == pytest.approx(4e-3)
    assert Config(lr_scaling="sqrt", lr=1e-3).lr_for(4) == pytest.approx(2e-3)
    assert cfg.global_batch_size(4) == 256


def test_sync_every_default_and_combinations():
    assert Config().sync_every == 1
    assert parse_args(["--sync-every", "16", "--backward-passes-per-step", "2"]).sync_every == 16
    assert parse_args(["--sync-every", "1", "--fp16-allreduce"]).fp16_allreduce  # K = 1 keeps fp16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": float("inf")}, "--lr must be a finite number"),
        ({"max_grad_norm": float("nan")}, "--max-grad-norm must be a finite number"),
        ({"target_return": float("inf")}, "--target-return must be a finite number"),
        ({"seed": -1}, "--seed must be in [0, "),
        ({"seed": 2**70}, "--seed must be in [0, "),
        ({"n_step": 256, "learning_starts_per_rank": 4000}, "--n-step must be at most 255"),
        ({"n_step": 126}, "fewer steps than --n-step (126)"),  # 1000 // 8 = 125 steps per env
    ],
)
def test_values_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**kwargs).validate()


def test_bounds_themselves_are_accepted():
    from mpirl.config import MAX_N_STEP, MAX_SEED

    Config(seed=0).validate()
    Config(seed=MAX_SEED).validate()
    Config(n_step=MAX_N_STEP, learning_starts_per_rank=8 * MAX_N_STEP, buffer_size_per_rank=8 * MAX_N_STEP).validate()
    Config(n_step=125).validate()  # 1000 // 8 = 125 steps per env: just enough


def test_a_run_that_could_never_update_is_refused_for_its_world_size():
    cfg = Config(total_env_steps=4000, learning_starts_per_rank=1000).validate()
    jobcheck.world(cfg, 2)  # 2000 env steps per rank
    with pytest.raises(ConfigError, match="could never update"):
        jobcheck.world(cfg, 4)  # exactly 1000 per rank: the warm-up ends with the budget


def test_resume_conflicts_name_what_would_change_the_replays_meaning():
    stored = Config().to_dict()
    assert jobcheck.resume_conflicts(Config(), stored, same_world=True) == []
    changed = Config(n_step=2, gamma=0.9, prioritized=True, clip_rewards="on", buffer_size_per_rank=50_000)
    out = jobcheck.resume_conflicts(changed, stored, same_world=True)
    assert [line.split(":")[0] for line in out] == [
        "--n-step", "--gamma", "--prioritized", "--clip-rewards", "--buffer-size-per-rank"]  # fmt: skip
    assert "--n-step: checkpoint 3, this run 2" in out
    # Safe changes: a larger replay, another learning rate, more envs at another world size.
    other = Config(buffer_size_per_rank=200_000, lr=1e-3, num_envs_per_rank=16)
    assert jobcheck.resume_conflicts(other, stored, same_world=False) == []
    same = jobcheck.resume_conflicts(other, stored, same_world=True)
    assert same == ["--num-envs-per-rank: checkpoint 8, this run 16"]


def test_ranks_started_with_different_options_are_named():
    a, b = Config().to_dict(), Config(seed=2, hidden_sizes=(64,)).to_dict()
    jobcheck.same_everywhere(Config(), [a, dict(a)])
    with pytest.raises(ConfigError, match=r"different options \(--hidden-sizes, --seed\)"):
        jobcheck.same_everywhere(Config(), [a, b])


def test_a_replay_larger_than_the_nodes_memory_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(jobcheck, "available_memory", lambda: (10 * 2**30, "MemAvailable"))
    assert jobcheck.memory_shortfall(4 * 2**30, 2) == ""  # 8 GiB of 10: fits in 90%
    short = jobcheck.memory_shortfall(5 * 2**30, 2)  # 10 GiB of 10: does not
    assert "5.00 GiB per rank x 2 rank(s) on this node = 10.00 GiB" in short and "10.00 GiB available" in short
    cfg = Config(total_env_steps=100_000)
    jobcheck.world(cfg, 2, ["", ""])
    with pytest.raises(ConfigError, match="(rank 1's node)"):
        jobcheck.world(cfg, 2, ["", short])


def test_available_memory_reads_this_machine():
    have, source = jobcheck.available_memory()
    assert have > 0 and source
