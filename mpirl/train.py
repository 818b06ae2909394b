"""``python -m mpirl.train``: the command-line entry point (the loop is in mpirl.trainer).

python -m mpirl.train --help
mpirun -np 2 python -m mpi4py -m mpirl.train --env CartPole-v1 --seed 3
"""

import sys

from mpirl.trainer import main

if __name__ == "__main__":
    sys.exit(main())
