"""Q-networks built from observation shapes, not environments: MLP, Nature CNN, MinAtar CNN,
dueling head.

Images (3-D observations, channels first, uint8) get a CNN chosen by their size: Atari-sized
frames (H, W >= 36, e.g. 84x84) the Nature-DQN CNN, which scales 0..255 pixels to [0, 1] inside
the network; small grids (H, W <= 16, e.g. MinAtar's 10x10) the MinAtar paper's network, which
takes the planes as they are (0/1 occupancy, already in [0, 1]: dividing by 255 would shrink the
inputs 255-fold for nothing). Either way replay and the host->device copy stay uint8.

Precision (``--precision``): fp32, or bf16 autocast (``autocast``), where convolutions and matrix
products run in bfloat16 while weights, gradients, optimizer state and the Q head stay float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn


class QHead(nn.Module):
    """Plain linear Q head, or a dueling head: Q = V + A - mean(A)."""

    def __init__(self, in_features: int, n_actions: int, dueling: bool, hidden: int = 0) -> None:
        super().__init__()
        self.dueling = dueling
        if dueling:
            width = hidden or in_features
            self.value = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, 1))
            self.advantage = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, n_actions))
        else:
            self.q = nn.Linear(in_features, n_actions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dtype in (torch.bfloat16, torch.float16):
            # Under autocast the Q-values themselves stay float32: bf16 keeps 8 bits of mantissa
            # (steps of 0.06 between 8 and 16), coarser than the TD errors DQN learns from. The
            # head is a few hundred multiply-adds per sample, so this costs next to nothing.
            with torch.autocast(h.device.type, enabled=False):
                return self._q(h.float())
        return self._q(h)

    def _q(self, h: torch.Tensor) -> torch.Tensor:
        if not self.dueling:
            return self.q(h)
        adv = self.advantage(h)
        return self.value(h) + adv - adv.mean(dim=1, keepdim=True)


class MLPQNetwork(nn.Module):
    """Q(s, .) for flat vector observations."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: Sequence[int], dueling: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = QHead(width, n_actions, dueling)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs.flatten(1).float()))


class NatureCNNQNetwork(nn.Module):
    """Mnih et al. 2015 network for (C, 84, 84)-like uint8 frame stacks."""

    def __init__(self, obs_shape: Sequence[int], n_actions: int, dueling: bool) -> None:
        super().__init__()
        c = obs_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )  # fmt: skip
        with torch.no_grad():
            n_flat = self.body(torch.zeros(1, *obs_shape)).shape[1]
        self.fc = nn.Sequential(nn.Linear(n_flat, 512), nn.ReLU())
        self.head = QHead(512, n_actions, dueling, hidden=512)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.body(obs.float() / 255.0)))


class MinAtarQNetwork(nn.Module):
    """Young & Tian 2019 (MinAtar) network for small (C, H, W) grids of 0/1 planes: one 3x3
    convolution of 16 channels, stride 1, no padding (10x10 -> 8x8), ReLU, a 128-unit layer,
    ReLU, then the Q head (dueling: value and advantage streams of 128 units each)."""

    FEATURES = 128

    def __init__(self, obs_shape: Sequence[int], n_actions: int, dueling: bool) -> None:
        super().__init__()
        c, h, w = obs_shape
        self.body = nn.Sequential(nn.Conv2d(c, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(16 * (h - 2) * (w - 2), self.FEATURES), nn.ReLU())
        self.head = QHead(self.FEATURES, n_actions, dueling, hidden=self.FEATURES)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.body(obs.float())))  # 0/1 planes: no /255 (module docstring)


SMALL_GRID = 16  # images with H, W <= this get the MinAtar network
LARGE_FRAME = 36  # images with H, W >= this get the Nature CNN (its 8x8/4, 4x4/2, 3x3/1 need >= 36)


def build(obs_shape: Sequence[int], n_actions: int, hidden_sizes: Sequence[int], dueling: bool) -> nn.Module:
    """The Q-network for an observation shape: the Nature CNN for (C, H, W) with H, W >= 36, the
    MinAtar network for 3 <= H, W <= 16, else an MLP of ``hidden_sizes`` (the CNNs ignore it)."""
    shape = tuple(int(s) for s in obs_shape)
    if len(shape) == 3 and min(shape[1:]) >= LARGE_FRAME:
        return NatureCNNQNetwork(shape, n_actions, dueling)
    if len(shape) == 3 and 3 <= min(shape[1:]) and max(shape[1:]) <= SMALL_GRID:
        return MinAtarQNetwork(shape, n_actions, dueling)
    if len(shape) in (1, 2) or len(shape) == 3:
        dim = 1
        for s in shape:
            dim *= s
        return MLPQNetwork(dim, n_actions, hidden_sizes, dueling)
    raise ValueError(f"observation shape {shape} is not supported (1-D vectors or (C, H, W) images)")


def all_finite(module: nn.Module) -> bool:
    """True when no parameter holds NaN or inf."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def parameter_checksum(model: nn.Module) -> float:
    """Sum of every parameter as float64: equal on all ranks iff (practically) identical."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context the Q-networks run in: none for fp32; for bf16 torch's autocast, whose
    convolutions and matrix products (forward and backward) run in bfloat16 on float32 weights
    (gradients, optimizer state and the Q head stay float32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_support(device: torch.device) -> tuple[str, str]:
    """(error, warning) about bf16 on ``device``, empty when it runs bf16 natively. A GPU without
    bf16 (before compute capability 8.0) is an error; a CPU without bf16 instructions
    (AVX512-BF16 or AMX) a warning: torch emulates them there, slower than float32."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            return f"--precision bf16: {name} has no bfloat16 arithmetic; use --precision fp32", ""
        return "", ""
    if not cpu_has_bf16():
        return "", (
            "this CPU has no bf16 instructions (AVX512-BF16 or AMX): --precision bf16 runs emulated, "
            "slower than --precision fp32"
        )
    return "", ""


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (True when torch cannot tell)."""
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return native is None or bool(native())
