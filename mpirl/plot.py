"""Learning curves from run directories: ``python -m mpirl.plot RUN_DIR [RUN_DIR ...]``.

    python -m mpirl.plot runs/CartPole-v1-s1-20250101-120000
    python -m mpirl.plot runs/k1-s* runs/k4-s* --label K=1 K=1 K=1 K=4 K=4 K=4 --out sync.png
    python -m mpirl.plot runs/a runs/b --x wall_time

Each RUN_DIR is a run directory holding ``metrics.jsonl`` (what rank 0 of ``mpirl.train``
writes), or a directory of such run directories (e.g. one per seed, or the Stable-Baselines3
runs of the benchmarks, which write the same records); the runs inside one directory share
its label. Drawn per label: the greedy evaluation mean return (``kind: eval`` records,
``eval_mean_return``) against global env steps (summed over all ranks) or wall time (seconds
since the run's training loop started, rank 0's clock), and the training episodes' mean return
(``kind: train``, ``mean_return``) as a lighter line. Several runs with one label (seeds) are
drawn as their median with a min-max band.

matplotlib is optional: ``pip install 'mpirl[plot]'``. Bad input prints
``mpirl: error: <one line>`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional, Sequence

import numpy as np

METRICS = "metrics.jsonl"
X_KEYS = {"env_steps": "global_env_steps", "wall_time": "wall_time_s"}
X_LABELS = {"env_steps": "global env steps (all ranks)", "wall_time": "wall time (s, from the training loop's start)"}
# Default label: a default run directory name without its seed and time stamp, so that
# runs/CartPole-v1-s1-<stamp> and runs/CartPole-v1-s2-<stamp> share the label CartPole-v1.
_SEED_SUFFIX = re.compile(r"([-_]s(eed)?\d+)?([-_]\d{8}-\d{6})?$")


class PlotError(ValueError):
    """Bad input: the message is one line, for the user as it stands."""


@dataclass
class Run:
    """One run's curves, in file order with superseded records dropped (see ``load_run``).

    x values are global env steps or wall-time seconds; y values are returns (sum of rewards
    per episode), NaN-free.
    """

    path: str
    label: str
    eval_x: list[float] = field(default_factory=list)
    eval_y: list[float] = field(default_factory=list)
    train_x: list[float] = field(default_factory=list)
    train_y: list[float] = field(default_factory=list)
    env_id: str = ""
    target_return: Optional[float] = None


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a finite JSON number, else None (NaN, missing, text)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _read_records(path: str) -> list[dict[str, Any]]:
    """The JSON records of a metrics.jsonl. A partial last line (a run killed mid-write) is
    ignored; any other line that is not a JSON object is an error."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
    except OSError as exc:
        raise PlotError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise PlotError(f"{path}: line {i + 1} is not JSON") from None
        if not isinstance(rec, dict):
            raise PlotError(f"{path}: line {i + 1} is not a JSON object")
        records.append(rec)
    return records


def load_run(path: str, label: str, x: str) -> Run:
    """Read one run directory's metrics.jsonl into curves against ``x`` (env_steps or wall_time).

    A resumed run appends to the same file: records whose env step count is not below that
    of a later record (from the part of a run redone after its last checkpoint) are
    superseded and dropped, and wall time, which restarts at 0 in each resumed process,
    continues from where the previous process's records ended.
    """
    run = Run(path=path, label=label)
    records = _read_records(os.path.join(path, METRICS))
    offset = last_wall = 0.0
    kept: list[tuple[str, float, float, float]] = []  # (kind, env steps, wall time, return)
    for rec in records:
        kind = rec.get("kind")
        if kind == "final":
            run.env_id = str(rec.get("env_id", run.env_id))
            tr = _number(rec.get("target_return"))
            run.target_return = tr if tr is not None else run.target_return
            continue
        y = _number(rec.get({"eval": "eval_mean_return", "train": "mean_return"}.get(str(kind), "")))
        steps, wall = _number(rec.get("global_env_steps")), _number(rec.get("wall_time_s"))
        if steps is None or wall is None:
            continue
        if wall + offset < last_wall:  # a new process (resume): its clock restarted at 0
            offset = last_wall
        last_wall = wall + offset
        kept = [k for k in kept if k[1] < steps or k[0] != kind]  # superseded by a redone stretch
        if y is not None:
            kept.append((str(kind), steps, last_wall, y))
    for kind, steps, wall, y in kept:
        xv = steps if x == "env_steps" else wall
        if kind == "eval":
            run.eval_x.append(xv)
            run.eval_y.append(y)
        else:
            run.train_x.append(xv)
            run.train_y.append(y)
    if not run.eval_x and not run.train_x:
        raise PlotError(f"{path}/{METRICS} holds no evaluation or training records")
    if not run.env_id:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
                run.env_id = str(json.load(fh).get("env_id", ""))
        except (OSError, ValueError, AttributeError):
            pass
    return run


def default_label(path: str) -> str:
    """A run directory's name without a trailing ``-s<seed>`` / ``-seed<seed>`` and time stamp."""
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return _SEED_SUFFIX.sub("", name) or name


def find_runs(paths: Sequence[str], labels: Optional[Sequence[str]], x: str) -> list[Run]:
    """Load every run named on the command line; a directory without metrics.jsonl stands for
    the run directories directly inside it, which share its label."""
    if labels and len(labels) != len(paths):
        raise PlotError(f"--label got {len(labels)} label(s) for {len(paths)} run directories; give one per directory")
    runs: list[Run] = []
    for i, path in enumerate(paths):
        if not os.path.isdir(path):
            raise PlotError(f"{path}: no such directory")
        label = labels[i] if labels else default_label(path)
        if os.path.isfile(os.path.join(path, METRICS)):
            runs.append(load_run(path, label, x))
            continue
        subs = sorted(os.path.join(path, d) for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, METRICS)))
        if not subs:
            raise PlotError(f"{path}: no {METRICS} in it or in the directories inside it (not a run directory?)")
        runs.extend(load_run(sub, label, x) for sub in subs)
    return runs


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, ...]:
    """Median, min and max of several curves on the union of their x values.

    Each curve is interpolated linearly within its own x range, holds its last value after
    it (a run that stopped early, e.g. on reaching the target return, stays where it ended)
    and is absent before its first point. Returns (x, median, min, max).
    """
    grid = np.unique(np.concatenate([np.asarray(cx, dtype=float) for cx, _ in curves]))
    ys = np.full((len(curves), len(grid)), np.nan)
    for i, (cx, cy) in enumerate(curves):
        order = np.argsort(np.asarray(cx, dtype=float), kind="stable")
        xs, yv = np.asarray(cx, dtype=float)[order], np.asarray(cy, dtype=float)[order]
        ys[i] = np.interp(grid, xs, yv)
        ys[i, grid < xs[0]] = np.nan
    return grid, np.nanmedian(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


def draw(runs: Sequence[Run], out: str, x: str) -> None:
    """Write the learning-curve figure of ``runs`` to ``out`` (format from its extension)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'mpirl[plot]' (or MPIRL_EXTRAS=plot)") from None
    matplotlib.use("Agg")  # files only: no display needed, works on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    labels = list(dict.fromkeys(r.label for r in runs))  # first-seen order
    banded = len(labels) < len(runs)  # some label has several runs
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # the tab10 colours by default
    fig, ax = plt.subplots(figsize=(8.0, 5.0), dpi=120)
    handles: list[Any] = []
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        group = [r for r in runs if r.label == label]
        train = [(r.train_x, r.train_y) for r in group if r.train_x]
        if train:
            gx, med, _, _ = band(train)
            ax.plot(gx, med, color=color, alpha=0.35, linewidth=1.0)
        evals = [(r.eval_x, r.eval_y) for r in group if r.eval_x]
        if evals:
            gx, med, lo, hi = band(evals)
            ax.plot(gx, med, color=color, linewidth=2.0, marker="o" if len(gx) <= 40 else None, markersize=3)
            if len(evals) > 1:
                ax.fill_between(gx, lo, hi, color=color, alpha=0.18, linewidth=0)
        n = len(group)
        handles.append(Line2D([], [], color=color, linewidth=2.0, label=f"{label} ({n} runs)" if n > 1 else label))
    handles += [
        Line2D(
            [],
            [],
            color="0.3",
            linewidth=2.0,
            label="greedy evaluation" + (" (median, min-max band)" if banded else ""),
        ),
        Line2D([], [], color="0.3", linewidth=1.0, alpha=0.35, label="training episodes"),
    ]
    targets = {r.target_return for r in runs}
    if len(targets) == 1 and None not in targets:
        target = targets.pop()
        assert target is not None
        ax.axhline(target, color="0.5", linestyle="--", linewidth=1.0)
        handles.append(Line2D([], [], color="0.5", linestyle="--", linewidth=1.0, label=f"target {target:g}"))
    if x == "env_steps":
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    envs = {r.env_id for r in runs if r.env_id}
    ax.set_title(f"{envs.pop()}: learning curves" if len(envs) == 1 else "learning curves")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("episode return")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="best", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as exc:
        raise PlotError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other mpirl error
        raise PlotError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mpirl.plot",
        description="Draw learning curves (greedy evaluation and training return) from mpirl run directories.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or directories of them")
    p.add_argument("--out", default="learning_curves.png", help="image file to write (PNG, SVG, PDF by extension)")
    p.add_argument("--x", choices=tuple(X_KEYS), default="env_steps", help="x axis: global env steps or wall time")
    p.add_argument(
        "--label",
        nargs="+",
        default=None,
        help="one label per RUN_DIR; runs with equal labels are drawn as median and min-max band "
        "(default: the directory name without -s<seed> and time stamp)",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: 0 when the figure was written, 2 on bad input or a missing matplotlib."""
    try:
        args = build_parser().parse_args(argv)
        runs = find_runs(args.run_dirs, args.label, args.x)
        draw(runs, args.out, args.x)
    except PlotError as exc:
        sys.stderr.write(f"mpirl: error: {exc}\n")
        return 2
    n_labels = len({r.label for r in runs})
    print(f"mpirl: wrote {args.out} ({len(runs)} run(s), {n_labels} label(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
