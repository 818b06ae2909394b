"""``--precision bf16``: torch autocast around the Q-networks. The hidden layers' products run in
bfloat16, the Q-values, weights, gradients and Adam state stay float32, and an update lands
close to (but not bit for bit on) the float32 one; devices without bf16 are refused (GPU) or
warned about (CPU), alike on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_learner import ctx, known_transitions, make_buffer, make_cfg

from mpirl import jobcheck, model
from mpirl.config import ConfigError
from mpirl.learner import Learner


def _learner(precision: str) -> Learner:
    cfg = make_cfg(precision=precision, hidden_sizes=(64, 64), double_dqn=True, max_grad_norm=10.0)
    return Learner(cfg, (2,), 2, ctx())


def _dtypes_of_layers(net: torch.nn.Module) -> dict[str, list[torch.dtype]]:
    """Record each Linear's output dtype on every call (forward hooks)."""
    seen: dict[str, list[torch.dtype]] = {}
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(o.dtype))
    return seen


def test_bf16_update_runs_hidden_layers_in_bf16_and_keeps_float32_state():
    fp32, bf16 = _learner("fp32"), _learner("bf16")
    for a, b in zip(fp32.online.parameters(), bf16.online.parameters()):
        assert torch.equal(a, b)  # the same seed: the same start
    start = [p.detach().clone() for p in fp32.online.parameters()]
    seen = _dtypes_of_layers(bf16.online)
    buf = make_buffer(known_transitions())
    losses = []
    for learner in (fp32, bf16):
        learner.start(buf, np.random.default_rng(7), beta=1.0)
        losses.append(float(learner.finish()))
    assert set(seen["body.0"]) == {torch.bfloat16} and set(seen["body.2"]) == {torch.bfloat16}
    assert set(seen["head.q"]) == {torch.float32}  # the Q-values: float32 under autocast
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert losses[1] != losses[0]  # autocast really ran
    # Adam's first step moves each weight by about lr * sign(gradient): the bf16 gradient points
    # the way the float32 one does, but for entries whose gradient is near zero
    agree = [
        (torch.sign(b.detach() - w) == torch.sign(a.detach() - w)).float().mean()
        for w, a, b in zip(start, fp32.online.parameters(), bf16.online.parameters())
    ]
    assert float(torch.stack(agree).min()) > 0.9
    for p in bf16.online.parameters():
        assert p.dtype == torch.float32 and p.grad is None
    for state in bf16.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    acts = bf16.greedy(np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32))
    assert acts.dtype == np.int64 and acts.shape == (5,)


@pytest.mark.parametrize("dueling", [False, True])
def test_minatar_network_under_autocast_gives_float32_q_values_close_to_fp32(dueling):
    torch.manual_seed(0)
    net = model.MinAtarQNetwork((4, 10, 10), 6, dueling)
    obs = (torch.rand(64, 4, 10, 10) > 0.8).to(torch.uint8)
    with torch.no_grad():
        ref = net(obs)
        with model.autocast(torch.device("cpu"), "bf16"):
            got = net(obs)
        with model.autocast(torch.device("cpu"), "fp32"):
            same = net(obs)
    assert got.dtype == torch.float32 and torch.equal(same, ref)
    torch.testing.assert_close(got, ref, atol=0.02, rtol=0.05)
    assert not torch.equal(got, ref)


def test_a_device_without_bf16_is_refused_on_every_rank_and_a_slow_cpu_named():
    assert jobcheck.precision([("", ""), ("", "")]) == ""
    assert jobcheck.precision([("", ""), ("", "emulated")]) == "emulated (rank 1)"
    with pytest.raises(ConfigError, match=r"^no bf16 here \(rank 1\)$"):
        jobcheck.precision([("", "emulated"), ("no bf16 here", "")])


def test_bf16_support_on_cpu_warns_only_without_bf16_instructions(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(model, "cpu_has_bf16", lambda: True)
    assert model.bf16_support(cpu) == ("", "")
    monkeypatch.setattr(model, "cpu_has_bf16", lambda: False)
    error, warning = model.bf16_support(cpu)
    assert error == "" and "no bf16 instructions" in warning and "\n" not in warning
