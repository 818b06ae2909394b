"""Q-networks are built from shapes: MLP for vectors, Nature CNN for Atari frames, the MinAtar
network for small grids; dueling head."""

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


def test_minatar_network_for_small_grids_is_the_papers():
    net = model.build((4, 10, 10), 3, (256,), dueling=False)
    assert isinstance(net, model.MinAtarQNetwork)
    conv, fc = net.body[0], net.fc[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        4, 16, (3, 3), (1, 1), (0, 0))  # fmt: skip
    assert (fc.in_features, fc.out_features) == (16 * 8 * 8, 128)
    # Young & Tian 2019: 3x3x4x16 + 16, 1024x128 + 128, 128x3 + 3 parameters
    assert sum(p.numel() for p in net.parameters()) == 4 * 9 * 16 + 16 + 1024 * 128 + 128 + 128 * 3 + 3
    planes = torch.randint(0, 2, (5, 4, 10, 10), dtype=torch.uint8)
    out = net(planes)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, net(planes.float()))  # 0/1 planes go in unscaled
    duel = model.build((10, 10, 10), 6, (256,), dueling=True)
    assert isinstance(duel, model.MinAtarQNetwork) and duel(torch.zeros(2, 10, 10, 10)).shape == (2, 6)


def test_images_between_the_cnns_sizes_get_the_mlp():
    assert isinstance(model.build((3, 20, 20), 2, (8,), dueling=False), model.MLPQNetwork)
    assert isinstance(model.build((3, 2, 2), 2, (8,), dueling=False), model.MLPQNetwork)


def test_checksum_changes_with_weights():
    net = model.build((4,), 2, (8,), dueling=False)
    c = model.parameter_checksum(net)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert model.parameter_checksum(net) != c
