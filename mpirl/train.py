"""``python -m mpirl.train``: the command-line entry point (the run itself is mpirl.trainer.fit).

python -m mpirl.train --help
mpirun -np 2 python -m mpi4py -m mpirl.train --env CartPole-v1 --seed 3

The Python API is ``mpirl.fit(cfg)``. This module is callable only to say so: before the
rename, ``from mpirl import train`` meant the function, and after ``import mpirl.train`` it
meant this module; a script that still calls it gets a one-line TypeError naming the fix.
"""

import sys
import types
from typing import Any, NoReturn

from mpirl.dist import exit_process
from mpirl.trainer import main


class _CommandLineModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("mpirl.train is the command-line module (python -m mpirl.train); call mpirl.fit(cfg)")


sys.modules[__name__].__class__ = _CommandLineModule

if __name__ == "__main__":
    exit_process(main())
