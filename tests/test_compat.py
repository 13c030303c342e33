"""``fastadapt.compat``: scripts written for the MAML-Pytorch reference code, unchanged.

Every check below uses only the reference code's call forms (``Learner(config, imgc, imgsz)``,
``Meta(args, config)``, ``maml(x_spt, y_spt, x_qry, y_qry)``, ``maml.finetunning(...)``,
``net(x, vars, bn_training)``); the references are loops written the way that code is, but with
``create_graph=True`` where second order is meant.
"""

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from fastadapt.compat import Learner, Meta
from helpers import shared_data
from fastadapt.compat import maml_pytorch
from fastadapt.models import miniimagenet_config, omniglot_config

SETTINGS = {"omniglot": (omniglot_config, 1, 28), "miniimagenet": (miniimagenet_config, 3, 84)}


def reference_args(**overrides):
    args = dict(update_lr=0.4, meta_lr=1e-3, n_way=3, k_spt=1, k_qry=2, task_num=2, update_step=2,
                update_step_test=3, imgc=1, imgsz=28)
    args.update(overrides)
    return argparse.Namespace(**args)


def episode(args, dtype=torch.float32, tasks=None):
    tasks = args.task_num if tasks is None else tasks
    g = torch.Generator().manual_seed(3)
    shape = (args.imgc, args.imgsz, args.imgsz)
    x_spt = torch.rand(tasks, args.n_way * args.k_spt, *shape, generator=g, dtype=dtype)
    x_qry = torch.rand(tasks, args.n_way * args.k_qry, *shape, generator=g, dtype=dtype)
    y_spt = torch.arange(args.n_way).repeat_interleave(args.k_spt).repeat(tasks, 1)
    y_qry = torch.arange(args.n_way).repeat_interleave(args.k_qry).repeat(tasks, 1)
    return x_spt, y_spt, x_qry, y_qry


def loop_meta_gradient(net, args, x_spt, y_spt, x_qry, y_qry, create_graph=True):
    """The reference ``Meta.forward``'s loop, written with the reference call forms."""
    loss_q = 0
    corrects = [0] * (args.update_step + 1)
    for i in range(args.task_num):
        fast = net.parameters()
        for k in range(args.update_step):
            loss = F.cross_entropy(net(x_spt[i], fast, bn_training=True), y_spt[i])
            grad = torch.autograd.grad(loss, fast, create_graph=create_graph)
            with torch.no_grad():
                corrects[k] += (net(x_qry[i], fast, bn_training=True).argmax(1) == y_qry[i]).sum().item()
            fast = [w - args.update_lr * g for w, g in zip(fast, grad)]
        logits_q = net(x_qry[i], fast, bn_training=True)
        corrects[-1] += (logits_q.argmax(1) == y_qry[i]).sum().item()
        loss_q = loss_q + F.cross_entropy(logits_q, y_qry[i])
    grads = torch.autograd.grad(loss_q / args.task_num, net.parameters())
    return grads, np.array(corrects) / (x_qry.shape[1] * args.task_num)


@pytest.mark.parametrize("name", ["omniglot", "miniimagenet"])
def test_meta_forward_is_second_order_and_equals_a_create_graph_loop_in_float64(name):
    make_config, imgc, imgsz = SETTINGS[name]
    # the reference's inner rates: 0.4 for Omniglot, 0.01 for miniImageNet
    args = reference_args(imgc=imgc, imgsz=imgsz, n_way=3, k_qry=2, update_lr=0.4 if name == "omniglot" else 0.01)
    config = make_config(args.n_way)
    torch.manual_seed(0)
    maml = Meta(args, config).double()
    before = copy.deepcopy(maml.net)
    data = episode(args, torch.float64)
    accs = maml(*data)
    assert isinstance(accs, np.ndarray) and accs.shape == (args.update_step + 1,)
    expected, expected_accs = loop_meta_gradient(before, args, *data)
    for got, want in zip(maml.net.parameters(), expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(accs, expected_accs, atol=1e-12)
    # and the step taken is Adam's first: every weight moved by about meta_lr
    moved = [(a - b).abs().max().item() for a, b in zip(maml.net.parameters(), before.parameters())]
    assert max(moved) == pytest.approx(args.meta_lr, rel=1e-3)


@pytest.mark.parametrize("name", ["omniglot", "miniimagenet"])
def test_first_order_is_the_reference_behaviour_and_differs_measurably(name):
    make_config, imgc, imgsz = SETTINGS[name]
    rate = 0.4 if name == "omniglot" else 0.01
    args = reference_args(imgc=imgc, imgsz=imgsz, update_lr=rate)
    torch.manual_seed(0)
    second = Meta(args, make_config(args.n_way)).double()
    first = Meta(reference_args(first_order=True, imgc=imgc, imgsz=imgsz, update_lr=rate),
                 make_config(args.n_way)).double()
    first.load_state_dict(second.state_dict())
    before = copy.deepcopy(second.net)
    data = episode(args, torch.float64)
    second(*data)
    first(*data)
    expected, _ = loop_meta_gradient(before, args, *data, create_graph=False)
    gap = 0.0
    for p1, p2, want in zip(first.net.parameters(), second.net.parameters(), expected):
        torch.testing.assert_close(p1.grad, want, rtol=1e-7, atol=1e-9)
        gap = max(gap, ((p1.grad - p2.grad).norm() / p2.grad.norm()).item())
    assert gap > 1e-3


@pytest.mark.parametrize("name", ["omniglot", "miniimagenet"])
def test_finetunning_returns_per_step_accuracy_and_touches_nothing(name):
    make_config, imgc, imgsz = SETTINGS[name]
    args = reference_args(update_step_test=4, k_qry=3, imgc=imgc, imgsz=imgsz,
                          update_lr=0.4 if name == "omniglot" else 0.01)
    torch.manual_seed(1)
    maml = Meta(args, make_config(args.n_way))
    x_spt, y_spt, x_qry, y_qry = episode(args, tasks=1)
    params = [p.detach().clone() for p in maml.parameters()]
    buffers = [b.clone() for b in maml.buffers()]
    accs = maml.finetunning(x_spt[0], y_spt[0], x_qry[0], y_qry[0])
    assert accs.shape == (args.update_step_test + 1,)
    assert all(torch.equal(a, b) for a, b in zip(params, maml.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, maml.buffers()))
    assert all(p.grad is None for p in maml.parameters())
    # the reference: deepcopy the net, adapt with net(x, vars, bn_training=True), count per step
    net = copy.deepcopy(maml.net)
    fast, corrects = net.parameters(), []
    for k in range(args.update_step_test + 1):
        with torch.no_grad():
            corrects.append((net(x_qry[0], fast, bn_training=True).argmax(1) == y_qry[0]).float().mean().item())
        if k < args.update_step_test:
            grad = torch.autograd.grad(F.cross_entropy(net(x_spt[0], fast), y_spt[0]), fast)
            fast = [w - args.update_lr * g for w, g in zip(fast, grad)]
    np.testing.assert_allclose(accs, corrects, atol=1e-6)
    with pytest.raises(ValueError, match="one task"):
        maml.finetunning(x_spt, y_spt, x_qry, y_qry)


def test_learner_call_contract_and_initialisation():
    torch.manual_seed(0)
    net = Learner(omniglot_config(5), 1, 28)
    x = torch.rand(6, 1, 28, 28)
    assert net(x).shape == (6, 5) and net(x, vars=None, bn_training=True).shape == (6, 5)
    weights = net.parameters()
    assert isinstance(weights, list) and len(weights[:5]) == 5 and weights is not None
    assert [w.shape for w in net.vars] == [p.shape for p in net.net.parameters()]
    assert len(net.vars_bn) == 8 and all(not b.requires_grad for b in net.vars_bn)
    # Kaiming-normal (fan-in, ReLU gain) weights, zero biases, BatchNorm weight 1
    conv = net.vars[0]
    assert conv.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)
    assert net.vars[4].std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert torch.equal(net.vars[1], torch.zeros(64)) and torch.equal(net.vars[2], torch.ones(64))
    # net(x, fast_weights) uses the given weights
    doubled = [2 * w for w in net.vars]
    out = net(x, doubled)
    copied = copy.deepcopy(net)
    with torch.no_grad():
        for w in copied.parameters():
            w.mul_(2)
    torch.testing.assert_close(out, copied(x))
    with pytest.raises(ValueError, match="vars has 3 tensors"):
        net(x, doubled[:3])
    # bn_training=False normalises with the running statistics; True updates them, as the reference
    before = [b.clone() for b in net.vars_bn]
    evaluated = net(x, bn_training=False)
    assert all(torch.equal(a, b) for a, b in zip(before, net.vars_bn))
    assert not torch.allclose(evaluated, net(x, bn_training=True))
    assert not torch.equal(before[0], net.vars_bn[0])
    # zero_grad(vars) clears only those gradients
    net(x).sum().backward()
    net.zero_grad(net.vars[:2])
    assert net.vars[0].grad.abs().sum() == 0 and net.vars[5].grad.abs().sum() > 0
    net.zero_grad()
    assert all(w.grad.abs().sum() == 0 for w in net.vars)
    text = repr(net)
    assert "conv2d:(ch_in:1, ch_out:64, k:3x3, stride:2, padding:0)" in text and "linear:(in:64, out:5)" in text


def test_compat_is_importable_under_both_names_and_checks_args():
    assert maml_pytorch.Meta is Meta and maml_pytorch.Learner is Learner
    with pytest.raises(ValueError, match="no field 'update_step_test'"):
        Meta(argparse.Namespace(update_lr=0.4, meta_lr=1e-3, n_way=5, k_spt=1, k_qry=15, task_num=4,
                                update_step=5, imgc=1, imgsz=28), omniglot_config(5))


def test_family_at_the_top_level_and_meta_sgd_rates_in_parameter_order():
    assert {fastadapt.MetaSGD, fastadapt.ANIL, fastadapt.Reptile, fastadapt.ProtoNet} == {
        fastadapt.algorithms.MetaSGD, fastadapt.algorithms.ANIL, fastadapt.algorithms.Reptile,
        fastadapt.algorithms.ProtoNet}
    model = fastadapt.models.Learner(omniglot_config(5))
    learner = fastadapt.MetaSGD(model, inner_lr=0.1)
    names = [name.replace(".", "__") for name, _ in model.named_parameters()]
    assert list(learner.inner_lrs.keys()) == names  # layer order, weight before bias: not sorted by name
    assert all(p.shape == r.shape for p, r in zip(model.parameters(), learner.inner_lrs.values()))


def test_cli_takes_underscore_flags_and_a_network_config(tmp_path, capsys):
    from fastadapt.checkpoint import load_checkpoint
    from fastadapt.cli import main

    root = shared_data("omniglot/images_background_small1.zip").parent
    shared_data("omniglot/images_background_small2.zip")
    network = [["conv2d", [16, 1, 3, 3, 2, 0]], ["relu", [True]], ["bn", [16]],
               ["conv2d", [16, 16, 3, 3, 2, 0]], ["relu", [True]], ["bn", [16]],
               ["flatten", []], ["linear", [5, 16 * 6 * 6]]]
    (tmp_path / "net.json").write_text(json.dumps(network))
    args = ["train", "--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
            "--val-split", "background_small2", "--val-alphabets", "Tagalog,Sanskrit", "--network",
            str(tmp_path / "net.json"), "--n_way", "5", "--k_spt", "1", "--k_qry", "3", "--task_num", "2",
            "--meta_lr", "1e-3", "--update_lr", "0.4", "--update_step", "1", "--update_step_test", "2",
            "--epoch", "3", "--imgsz", "28", "--imgc", "1", "--val-episodes", "2", "--test-episodes", "2",
            "--quiet", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "2 test tasks" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run")
    data, config = state["config"]["data"], state["config"]
    assert (data["n_way"], data["k_shot"], data["task_batch"], config["algorithm"]["inner_steps_test"]) == (5, 1, 2, 2)
    assert config["model"]["network"] == network and "model.7.weight" in state["model"]
    # a network whose output does not match --n-way, and a broken file, are one-line errors
    assert main(args[:-2] + ["--n_way", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "--network ends in a linear layer of 5 outputs, but n_way is 3" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("[[\"conv9\", []]]")
    assert main(["train", "--network", str(tmp_path / "broken.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "unknown layer 'conv9'" in err
