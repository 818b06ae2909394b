"""mpirl: synchronous data-parallel deep Q-learning over MPI ranks with Horovod.

from mpirl import Config, train
summary = train(Config(env_id="CartPole-v1", seed=3))   # run under mpirun for N ranks
"""

from __future__ import annotations

from typing import Any

from mpirl.config import Config, ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Summary", "train", "__version__"]


def __getattr__(name: str) -> Any:
    # train pulls in torch and horovod; keep `import mpirl` (and config parsing) light.
    if name in ("train", "Summary"):
        from mpirl import trainer as _train_mod

        return getattr(_train_mod, name)
    raise AttributeError(f"module 'mpirl' has no attribute {name!r}")
