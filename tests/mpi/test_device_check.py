"""benchmarks/device_check.sh in its CPU dry mode: every step of the GPU check but the GPU
(CartPole at 1 rank, the Pong profile in float32 and bf16, 2 ranks sharing a device through torchrun + Gloo, a
checkpoint resumed on the other device), so the script cannot rot between device loans."""

import json
import os

import pytest
from mpi_launch import mpi_env, run

pytestmark = pytest.mark.mpi
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_device_check_dry_run_passes_every_step(tmp_path):
    res = run(["bash", os.path.join(REPO, "benchmarks", "device_check.sh"), "--dry"], timeout=420,
              env=mpi_env({"OUT": str(tmp_path)}), cwd=REPO)  # fmt: skip
    assert res.returncode == 0, res.output[-4000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry_run"] and all(report["checks"].values()), report["checks"]
    assert [s["rc"] for s in report["steps"].values()] == [0] * 10
    for key, backend, precision in (("b_pong", "gymnasium", "fp32"), ("b_pong_envpool", "envpool", "fp32"),
                                    ("f_pong_bf16", "envpool", "bf16")):  # fmt: skip
        pong = report[key]
        assert pong["env_backend"] == backend and pong["precision"] == precision
        assert pong["training_frames_per_s"] > 0 and pong["updates_per_s"] > 0
        assert set(pong["share"]) == {"env", "sample", "host_to_device", "allreduce", "update"}
        assert abs(sum(pong["share"].values()) - 1.0) < 0.01
    overhead = report["e_overhead"]
    assert set(overhead["iteration_ms_by_torch_threads"]) >= {"1"} and overhead["top_host_ops"]
    assert all(v > 0 for v in overhead["iteration_ms_by_torch_threads"].values())
    # What comes back from a device is these three files (its tool brings back at most eight).
    assert sorted(os.listdir(tmp_path)) == ["device_check.json", "device_check.txt", "device_check_logs.tar.gz"]
    assert report["c_shared_gpu"]["world_size"] == 2 and report["c_shared_gpu"]["replicas_identical"]
    assert report["d_resumed"] == {"d_then_cpu": True, "d_then_cuda": True}
