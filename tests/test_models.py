import pytest
import torch

from fastadapt import MAML, TaskBatch
from fastadapt.models import Learner, conv4, miniimagenet_config, mlp, omniglot_config


def test_seed_omniglot_config_maps_28x28x1_to_n_way():
    net = Learner(omniglot_config(5))
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 + [(2, 2)]
    assert all(c.padding == (0, 0) and c.out_channels == 64 for c in convs)
    assert net(torch.rand(7, 1, 28, 28)).shape == (7, 5)


def test_seed_miniimagenet_config_maps_84x84x3_to_n_way():
    net = Learner(miniimagenet_config(5))
    assert net[-1].in_features == 32 * 5 * 5
    kinds = [type(m).__name__ for m in net][:4]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm", "MaxPool2d"]
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_learner_trains_under_maml_like_any_module():
    net = Learner(omniglot_config(3))
    batch = TaskBatch(torch.rand(2, 3, 1, 28, 28), torch.arange(3).repeat(2, 1),
                      torch.rand(2, 6, 1, 28, 28), torch.randint(0, 3, (2, 6)))
    out = MAML(net, inner_steps=1).meta_loss(batch)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_learner_other_layers():
    net = Learner([("linear", [16, 4]), ("leakyrelu", [0.1, True]), ("reshape", [1, 4, 4]),
                   ("convt2d", [1, 2, 2, 2, 2, 0]), ("upsample", [2]), ("avg_pool2d", [2, 2, 0]),
                   ("sigmoid", []), ("flatten", []), ("tanh", [])])
    assert net(torch.rand(3, 4)).shape == (3, 2 * 8 * 8)


@pytest.mark.parametrize("config, message", [
    ([("linear", [5, 4]), ("dense", [3])], r"entry 1: unknown layer 'dense'"),
    ([("conv2d", [64, 1, 3, 3, 2])], r"entry 0 \('conv2d'\): expected args \[out, in, kernel_h"),
    ([("relu", [True]), ("bn", [])], r"entry 1 \('bn'\): expected args \[channels\]"),
    ([("linear",)], r"entry 0: expected a \(name, args\) pair"),
])
def test_learner_rejects_bad_config_naming_the_entry(config, message):
    with pytest.raises(ValueError, match=message):
        Learner(config)


def test_conv4_shapes():
    assert conv4()(torch.rand(4, 1, 28, 28)).shape == (4, 5)
    net = conv4(in_channels=3, n_way=5, hidden=32, image_size=84, pool="max")
    assert net.head.in_features == 32 * 5 * 5
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    assert conv4().head.in_features == 64
    with pytest.raises(ValueError, match="pool"):
        conv4(pool="avg")


def test_mlp_shapes():
    assert mlp()(torch.rand(10, 1)).shape == (10, 1)
    assert mlp(3, 2, hidden=(8,))(torch.rand(5, 3)).shape == (5, 2)
