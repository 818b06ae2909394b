"""Worker (run on every rank): train with the Config given as JSON, write this rank's view.

Usage: python -m mpi4py train_and_report.py OUT_DIR '{"total_env_steps": 2000, ...}'
Writes OUT_DIR/rank<R>.json with a hash of every parameter byte, the checksum's min/max
across ranks (a collective), and the summary.
"""

import hashlib
import json
import os
import sys
from dataclasses import asdict

import torch

from mpirl import Config, dist, fit
from mpirl.learner import Learner


def params_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    if "hidden_sizes" in overrides:
        overrides["hidden_sizes"] = tuple(overrides["hidden_sizes"])
    captured = {}
    original = Learner.__init__

    def spy(self, *a, **k):  # keep a handle on the learner to hash its networks afterwards
        original(self, *a, **k)
        captured["agent"] = self

    Learner.__init__ = spy
    summary = fit(Config(**overrides))
    agent = captured["agent"]
    lo, hi = dist.allreduce_min_max(summary.param_checksum, name="test.checksum")
    report = {
        "rank": int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")),
        "online_sha256": params_sha256(agent.online),
        "target_sha256": params_sha256(agent.target),
        "optimizer_steps": [int(s["step"]) for s in agent.optimizer.state_dict()["state"].values()],
        "checksum_min": lo,
        "checksum_max": hi,
        "summary": asdict(summary),
    }
    with open(os.path.join(out_dir, f"rank{report['rank']}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()  # returns as a user's script does: the torch backend's exit must hold (dist_torch.destroy)
