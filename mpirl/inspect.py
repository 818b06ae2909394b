"""``python -m mpirl.inspect FILE``: print a checkpoint's summary (step, config, shards, sizes).

python -m mpirl.inspect runs/CartPole-v1-s1-.../checkpoints/step-000000050000.h5
python -m mpirl.inspect RUN_DIR            # its latest checkpoint
python -m mpirl.inspect FILE --json        # everything, as JSON
python -m mpirl.inspect FILE --verify      # also check every checksum (exit 2 naming a damaged object)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from mpirl import checkpoint


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpirl.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a checkpoint file, or a run directory (its latest checkpoint)")
    ap.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    ap.add_argument("--verify", action="store_true", help="check every dataset and attribute against its checksum")
    args = ap.parse_args(argv)
    try:
        path = checkpoint.resolve(args.path)
        s = checkpoint.summary(path)
        if args.verify:
            checked, nbytes = checkpoint.verify(path)
            s["verified"] = {"checksums": checked, "stored_bytes": nbytes}
    except checkpoint.CheckpointError as exc:
        print(f"mpirl.inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    c = s["counters"]
    print(f"checkpoint: {path} ({_mib(s['file_bytes'])}, schema {s['schema_version']}, written {s['created']})")
    print(f"env: {s['env_id']}  obs shape {s['obs_shape']}  actions {s['n_actions']}")
    print(f"global env steps: {s['global_env_steps']:,}  updates: {s['updates']:,}  iteration: {c['iteration']:,}")
    print(f"world size: {s['world_size']}  last eval: {c['last_eval']}")
    if "verified" in s:
        n, nbytes = s["verified"]["checksums"], s["verified"]["stored_bytes"]
        print(f"verified: all {n} checksums match ({_mib(nbytes)} read)" if n else "verified: none (schema 1)")
    else:
        print(f"checksums: {s['checksums']} (not checked; --verify checks them)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()))
    cfg = s["config"]
    print("config: " + ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg)))
    for sh in s["shards"]:
        rs = sh["replay_state"]
        print(
            f"rank {sh['rank']}: {sh['transitions']:,} transitions (ring pos {rs.get('pos')}, "
            f"capacity {rs.get('capacity')}), replay {_mib(sh['raw_bytes'])} raw -> {_mib(sh['stored_bytes'])} "
            f"stored, env state {sh['env_state_bytes']:,} B"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
