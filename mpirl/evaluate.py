"""``python -m mpirl.evaluate FILE``: play a checkpoint's policy greedily (one process, no MPI).

python -m mpirl.evaluate runs/CartPole-v1-s1-.../checkpoints/step-000000050000.h5 --episodes 20
python -m mpirl.evaluate RUN_DIR --episodes 5 --video videos/    # needs moviepy
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mpirl import checkpoint, envs, model
from mpirl.config import Config, ConfigError
from mpirl.records import StoredCheckpoint


def load_policy(path: str, device: str = "cpu") -> tuple[torch.nn.Module, StoredCheckpoint, Config]:
    """The online Q-network of a checkpoint, ready for greedy play, its header and its run's
    options. Nothing stored in the file decides what gets imported: environments of user
    modules need ``--env-module``, the user's own flag. The header and the online network are
    checked against their checksums first (CheckpointError naming a damaged object)."""
    checkpoint.verify(path, only=["/model/online"])
    stored = checkpoint.read_header(path)
    cfg = Config.from_dict(stored.header.config, source=path)
    h = stored.header
    net = model.build(tuple(h.obs_shape), h.n_actions, cfg.hidden_sizes, cfg.dueling)
    checkpoint.load_module(path, "online", net)
    return net.to(device).eval(), stored, cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpirl.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a checkpoint file, or a run directory (its latest checkpoint)")
    ap.add_argument("--episodes", type=int, default=10, help="greedy episodes to play (default: 10)")
    ap.add_argument("--seed", type=int, default=10_000, help="seed of the first episode (default: 10000)")
    ap.add_argument("--video", default="", help="record every episode as MP4 into this folder (needs moviepy)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument(
        "--env-module", default="", help="comma-separated modules to import first, which register your environments"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if args.episodes <= 0:
        print("mpirl.evaluate: error: --episodes must be positive", file=sys.stderr)
        return 2
    try:
        envs.import_env_modules([m.strip() for m in args.env_module.split(",") if m.strip()])
        path = checkpoint.resolve(args.path)
        net, stored, cfg = load_policy(path, args.device)
    except (checkpoint.CheckpointError, envs.EnvError, ConfigError) as exc:
        print(f"mpirl.evaluate: error: {exc}", file=sys.stderr)
        return 2

    @torch.no_grad()
    def greedy(obs: np.ndarray) -> np.ndarray:
        with model.autocast(torch.device(args.device), cfg.precision):  # the policy as it was trained and evaluated
            return net(torch.as_tensor(obs, device=args.device)).argmax(dim=1).cpu().numpy()

    seeds = list(range(args.seed, args.seed + args.episodes))
    env_id, atari = stored.header.env_id, envs.atari_options(cfg)
    try:
        if args.video:
            returns = _play_recorded(env_id, atari, greedy, seeds, args.video)
        else:
            returns = envs.evaluate(greedy, env_id, seeds, atari=atari)
    except envs.EnvError as exc:
        hint = f" (it was trained with --env-module {cfg.env_module})" if cfg.env_module else ""
        print(f"mpirl.evaluate: error: {exc}{hint}", file=sys.stderr)
        return 2
    r = np.asarray(returns)
    steps = stored.header.global_env_steps
    result = {"checkpoint": path, "env_id": env_id, "global_env_steps": steps,
              "episodes": len(r), "mean": float(r.mean()), "std": float(r.std()), "min": float(r.min()),
              "max": float(r.max()), "returns": r.tolist()}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{env_id} @ {steps:,} env steps: greedy return {r.mean():.1f} "
            f"± {r.std():.1f} (min {r.min():.1f}, max {r.max():.1f}) over {len(r)} episodes"
        )
    return 0


def _play_recorded(
    env_id: str, atari: envs.AtariOptions, greedy: Callable[[np.ndarray], np.ndarray], seeds: list[int], folder: str
) -> list[float]:
    import gymnasium as gym

    try:
        import moviepy  # noqa: F401  (RecordVideo's encoder)
    except ImportError:
        raise SystemExit("mpirl.evaluate: error: --video needs moviepy (pip install moviepy)") from None
    env = gym.wrappers.RecordVideo(
        envs.make_env(env_id, atari, render_mode="rgb_array"),
        folder,
        episode_trigger=lambda _: True,
        name_prefix="mpirl",
    )
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            obs, rew, term, trunc, _ = env.step(int(greedy(obs[None])[0]))
            total += float(rew)
            done = term or trunc
        returns.append(total)
    env.close()
    return returns


if __name__ == "__main__":
    sys.exit(main())
