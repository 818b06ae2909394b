"""Worker (run on every rank): train with local SGD and record the replicas around every update.

Usage: python -m mpi4py sync_report.py OUT_DIR '{"sync_every": 4, ...}'
Writes OUT_DIR/rank<R>.json with, per update (Learner.finish() call), this rank's online weights afterwards
and the window position (0: the call ended with an averaging); per averaging, the weights
before and after it and the window length; and at the end, hashes of the networks and of the
Adam state, plus the summary.
"""

import hashlib
import json
import os
import sys
from dataclasses import asdict

import torch

from mpirl import Config, fit
from mpirl.learner import Learner


def flat(module: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).tolist()


def sha256(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    if "hidden_sizes" in overrides:
        overrides["hidden_sizes"] = tuple(overrides["hidden_sizes"])
    agent_cls = Learner
    captured: dict = {"updates": [], "syncs": []}
    original_init, original_update, original_sync = agent_cls.__init__, agent_cls.finish, agent_cls.sync_replicas

    def init(self, *a, **k):
        original_init(self, *a, **k)
        captured["agent"] = self

    def update(self, *a, **k):
        loss = original_update(self, *a, **k)
        captured["updates"].append({"params": flat(self.online), "since_sync": self._since_sync,
                                    "target": sha256(self.target.parameters())})  # fmt: skip
        return loss

    def sync(self):
        window = self._since_sync
        before = flat(self.online)
        original_sync(self)
        if self.local_sgd and window:  # an averaging happened (else a no-op)
            captured["syncs"].append({"window": window, "before": before, "after": flat(self.online)})

    agent_cls.__init__, agent_cls.finish, agent_cls.sync_replicas = init, update, sync
    summary = fit(Config(**overrides))
    agent = captured["agent"]
    states = [agent.optimizer.state[p] for p in agent.online.parameters()]
    report = {
        "rank": int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")),
        "local_sgd": agent.local_sgd,
        "online_sha256": sha256(agent.online.parameters()),
        "target_sha256": sha256(agent.target.parameters()),
        "adam_sha256": sha256([st[k] for st in states for k in ("exp_avg", "exp_avg_sq", "step")]),
        "adam_steps": [float(st["step"]) for st in states],
        "updates": captured["updates"],
        "syncs": captured["syncs"],
        "summary": asdict(summary),
    }
    with open(os.path.join(out_dir, f"rank{report['rank']}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()  # returns as a user's script does: the torch backend's exit must hold (dist_torch.destroy)
