"""Which checkpoint a run resumes from: rank 0 picks it, verifies its checksums and checks it
fits this run, before anything in the run directory is touched (the trainer broadcasts the
verdict). ``--resume auto`` skips damaged checkpoints, newest first, and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mpirl import checkpoint, envs, jobcheck
from mpirl.config import Config
from mpirl.records import StoredCheckpoint


def find(cfg: Config, run_dir: str, info: envs.EnvInfo, world_size: int) -> Optional[StoredCheckpoint]:
    """Rank 0: the checkpoint to resume from (None for a fresh start), verified and checked
    against this run; CheckpointError naming what is damaged or does not fit. With
    ``--resume auto``, damaged checkpoints are skipped for the newest intact one (its
    ``note`` says which were skipped); when every one is damaged, the run stops rather than
    start afresh over them."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        return _fitting(cfg, cfg.resume, info, world_size, _verified(cfg.resume))
    damaged: list[str] = []
    for path in checkpoint.newest_first(run_dir):
        try:
            note = _verified(path)
        except checkpoint.CheckpointError as exc:
            damaged.append(str(exc))
            continue
        if damaged:
            note = f"skipped {len(damaged)} damaged newer checkpoint(s) ({'; '.join(damaged)}); {note}"
        return _fitting(cfg, path, info, world_size, note)
    if damaged:
        raise checkpoint.CheckpointError(
            f"every checkpoint in {checkpoint.checkpoint_dir(run_dir)} is damaged ({'; '.join(damaged)}); "
            "nothing to resume from (move them aside to start afresh)"
        )
    return None


def _verified(path: str) -> str:
    """Verify every checksum of ``path`` (CheckpointError if one fails); a note for the log."""
    checked, nbytes = checkpoint.verify(path)
    if not checked:
        return "a schema-1 checkpoint: it carries no checksums, not verified"
    return f"{checked} checksums verified ({nbytes / 2**20:,.1f} MiB)"


def _fitting(cfg: Config, path: str, info: envs.EnvInfo, world_size: int, note: str) -> StoredCheckpoint:
    """The header of ``path``, if the checkpoint fits this run; CheckpointError naming the misfits."""
    stored = checkpoint.read_header(path)
    h = stored.header
    mismatch = [
        f"{what}: checkpoint {theirs}, this run {ours}"
        for what, theirs, ours in (
            ("env", h.env_id, cfg.env_id),
            ("observation shape", h.obs_shape, list(info.obs_shape)),
            ("actions", h.n_actions, info.n_actions),
        )
        if theirs != ours
    ]
    mismatch += jobcheck.resume_conflicts(cfg, h.config, same_world=stored.world_size == world_size)
    if mismatch:
        raise checkpoint.CheckpointError(f"{path} does not fit this run: {'; '.join(mismatch)}")
    return dataclasses.replace(stored, note=note)
