"""Worker: ``python -m mpirl.train`` on a machine that pretends to have one CUDA GPU.

Usage: python -m mpi4py fake_cuda.py [mpirl.train options]
torch.cuda reports a device, so mpirl takes its CUDA path up to the first real CUDA call: the
checks that must refuse a setup before any GPU work (a Horovod without GPU operations) run
as on a GPU host, on this CPU-only machine.
"""

import sys

import torch

torch.cuda.is_available = lambda: True  # type: ignore[assignment]
torch.cuda.device_count = lambda: 1  # type: ignore[assignment]

from mpirl.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
