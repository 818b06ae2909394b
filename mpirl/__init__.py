"""mpirl: synchronous data-parallel deep Q-learning over MPI ranks with Horovod.

from mpirl import Config, fit
summary = fit(Config(env_id="CartPole-v1", seed=3))   # run under mpirun for N ranks

``python -m mpirl.train`` is the command line; ``mpirl.fit`` is the Python API (named apart
from the ``mpirl.train`` module, so that importing one never shadows the other).
"""

from __future__ import annotations

from typing import Any

from mpirl.config import Config, ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Summary", "fit", "__version__"]


def __getattr__(name: str) -> Any:
    # fit pulls in torch and horovod; keep `import mpirl` (and config parsing) light.
    if name == "fit":
        from mpirl.trainer import fit

        return fit
    if name == "Summary":
        from mpirl.records import Summary

        return Summary
    raise AttributeError(f"module 'mpirl' has no attribute {name!r}")
