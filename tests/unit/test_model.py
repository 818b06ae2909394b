"""Q-networks are built from shapes: MLP for vectors, Nature CNN for images; dueling head."""

import torch

from mpirl import model


def test_mlp_shapes_and_dueling_mean_zero_advantage():
    net = model.build((4,), 2, (32, 32), dueling=False)
    assert isinstance(net, model.MLPQNetwork)
    assert net(torch.zeros(5, 4)).shape == (5, 2)
    duel = model.build((4,), 3, (32,), dueling=True)
    h = duel.body(torch.randn(6, 4))
    q = duel(torch.randn(6, 4))
    assert q.shape == (6, 3)
    h = duel.body(torch.ones(1, 4))
    adv = duel.head.advantage(h)
    expected = duel.head.value(h) + adv - adv.mean(1, keepdim=True)
    torch.testing.assert_close(duel(torch.ones(1, 4)), expected)


def test_cnn_for_images_takes_uint8():
    net = model.build((4, 84, 84), 6, (256,), dueling=True)
    assert isinstance(net, model.NatureCNNQNetwork)
    out = net(torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (2, 6)


def test_checksum_changes_with_weights():
    net = model.build((4,), 2, (8,), dueling=False)
    c = model.parameter_checksum(net)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert model.parameter_checksum(net) != c
