import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/mpi_launch.py


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MPIRL_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set MPIRL_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
