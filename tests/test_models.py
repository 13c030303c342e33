import pytest
import torch
from torch import nn

from fastadapt import MAML, TaskBatch
from fastadapt.models import Learner, TaskNorm2d, conv4, miniimagenet_config, mlp, omniglot_config


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


@pytest.mark.parametrize("options", [dict(stride=2, padding=1), dict(stride=1, padding=0, bias=True),
                                     dict(stride=(1, 2), padding=(2, 1), dilation=2)])
def test_first_layer_convolution_by_matmul_equals_conv2d_with_gradients_and_under_vmap(options):
    from torch.func import vmap
    from fastadapt.algorithms import forward

    options = {"bias": False, **options}
    conv = nn.Conv2d(1, 6, 3, **options).double()
    assert forward.uses_matmul(conv) and not forward.uses_matmul(nn.Conv2d(2, 6, 3))
    x = torch.rand(4, 1, 9, 11, dtype=torch.float64, requires_grad=True)
    expected = conv(x)
    with forward.applied(conv, forward.ForwardPolicy()):
        assert conv.forward is not nn.Conv2d.forward.__get__(conv)
        got = conv(x)
    assert "forward" not in conv.__dict__  # patch removed on exit
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, conv.weight], create_graph=True),
                    torch.autograd.grad(expected.square().sum(), [x, conv.weight], create_graph=True)):
        torch.testing.assert_close(a, b)
        # second order: differentiate the gradient again
        torch.testing.assert_close(torch.autograd.grad(a.sum(), conv.weight, retain_graph=True)[0],
                                   torch.autograd.grad(b.sum(), conv.weight, retain_graph=True)[0])
    weights = torch.rand(3, *conv.weight.shape, dtype=torch.float64)
    images = torch.rand(3, 4, 1, 9, 11, dtype=torch.float64)
    params = {"weight": weights, **({"bias": torch.rand(3, 6, dtype=torch.float64)} if conv.bias is not None else {})}

    def run(p, xs):
        return torch.func.functional_call(conv, p, (xs,))

    expected = vmap(run)(params, images)
    with forward.applied(conv, forward.ForwardPolicy()):
        torch.testing.assert_close(vmap(run)(params, images), expected)


# ---------------------------------------------------------------------- TaskNorm-I (--norm tasknorm)
def test_tasknorm_blends_the_context_statistics_with_each_images_own():
    import torch.nn.functional as F
    from fastadapt.algorithms import forward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    norm = TaskNorm2d(3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        norm.blend.fill_(0.4)
    alpha = torch.sigmoid(torch.tensor(0.4, dtype=torch.float64))
    for rows in (None, 2):
        context = x if rows is None else x[:rows]
        context_mean = context.mean(dim=(0, 2, 3), keepdim=True)
        context_var = ((context - context_mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        image_mean = x.mean(dim=(2, 3), keepdim=True)
        image_var = ((x - image_mean) ** 2).mean(dim=(2, 3), keepdim=True)
        mean = alpha * context_mean + (1 - alpha) * image_mean
        var = alpha * (context_var + (context_mean - mean) ** 2) + (1 - alpha) * (image_var + (image_mean - mean) ** 2)
        expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        with forward.applied(norm, forward.ForwardPolicy(reference_rows=rows)):
            torch.testing.assert_close(norm(x), expected)
    with forward.applied(norm, forward.ForwardPolicy(reference_rows=2)):
        changed = x.clone()
        changed[3:] = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        torch.testing.assert_close(norm(changed)[:3], norm(x)[:3], rtol=0, atol=0)  # a row depends on itself
    with torch.no_grad():
        norm.blend.fill_(40.0)  # alpha 1: BatchNorm with batch statistics
    torch.testing.assert_close(norm(x), F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps))
    with torch.no_grad():
        norm.blend.fill_(-40.0)  # alpha 0: instance normalisation
    torch.testing.assert_close(norm(x), F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps))
    with pytest.raises(ValueError, match="needs spatial positions"):
        norm(torch.zeros(4, 3))


def test_second_order_maml_through_tasknorm_matches_the_loop_reference_and_learns_the_blend():
    from helpers import grads_of, image_batch, loop_meta_loss

    torch.manual_seed(0)
    model = conv4(1, 3, hidden=4, image_size=8, norm="tasknorm").double()
    batch = image_batch(tasks=2)
    out = MAML(model, inner_lr=0.3, inner_steps=2).meta_loss(batch)
    reference, _ = loop_meta_loss(model, batch, 0.3, 2, create_graph=True, per_step=False)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads_of(out.loss, model), grads_of(reference, model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
        if name.endswith("blend"):
            assert a.abs() > 0, name


def test_a_tasknorm_protonet_in_support_mode_classifies_each_query_alone_as_together():
    from fastadapt.algorithms import ProtoNet, Pretrain
    from helpers import image_batch

    torch.manual_seed(0)
    learner = ProtoNet(conv4(1, 3, hidden=4, image_size=8, norm="tasknorm").double(), n_way=3)
    learner.query_statistics = "support"
    batch = image_batch(tasks=1, n_way=3, shots=2, queries=3)
    support_x, support_y, query = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    fast = learner.adapt(support_x, support_y)
    with torch.no_grad():
        together = learner.predict(fast, query, reference=support_x)
        alone = torch.cat([learner.predict(fast, query[i:i + 1], reference=support_x) for i in range(len(query))])
    torch.testing.assert_close(alone, together)
    out = learner.fine_tune(batch)
    torch.testing.assert_close(out.task_loss[0, -1], torch.nn.functional.cross_entropy(together, batch.query_y[0]))
    from fastadapt.algorithms import MAMLPlusPlus, forward

    with pytest.raises(ValueError, match=r"TaskNorm \(--norm tasknorm\) keeps none"):
        Pretrain(conv4(1, 3, hidden=4, image_size=8, norm="tasknorm"))
    with pytest.raises(ValueError, match="add --no-per-step-bn"):
        MAMLPlusPlus(conv4(1, 3, hidden=4, image_size=8, norm="tasknorm"), per_step_bn=True)
    norm = TaskNorm2d(3)
    with forward.applied(norm, forward.ForwardPolicy(statistics="running")), \
            pytest.raises(ValueError, match="keeps no running statistics"):
        norm(torch.zeros(2, 3, 4, 4))
