"""The GPU paths against the CPU ones: every learner's meta-loss and meta-gradient, evaluation
with views and ensembles, prediction, and a run trained on the GPU used on the CPU.

On CUDA the engine takes other paths than on the CPU (all tasks in one vmapped call, the query
set vmapped with the support set, no im2col convolutions), so each check computes the same thing
on both devices in float64 and compares. Skipped where there is no GPU (CI has none); run on a
GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

import copy

import pytest
import torch

from fastadapt import MAML, Predictor, PredictorEnsemble, evaluate
from fastadapt.algorithms import ANIL, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from fastadapt.algorithms.pretrain import Pretrain
from fastadapt.cli import main
from fastadapt.data import RandomAffine
from fastadapt.evaluate import Member
from fastadapt.models import conv4, resnet12

from helpers import TINY_ARGS, glyph_files, grads_of, image_batch, loop_meta_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def small(n_way=3):
    torch.manual_seed(0)
    return conv4(1, n_way, hidden=4, image_size=8).double()


LEARNERS = {
    "maml": lambda: MAML(small(), inner_lr=0.4, inner_steps=3),
    "fomaml": lambda: MAML(small(), inner_lr=0.4, inner_steps=3, first_order=True),
    "mamlpp": lambda: MAMLPlusPlus(small(), inner_lr=0.4, inner_steps=3, multi_step_loss=10, lslr=True,
                                   per_step_bn=True),
    "metasgd": lambda: MetaSGD(small(), inner_lr=0.4, inner_steps=2),
    "anil": lambda: ANIL(small(), inner_lr=0.4, inner_steps=2),
    "protonet": lambda: ProtoNet(small(), n_way=3),
    "pretrain-logistic": lambda: Pretrain(small(), head="logistic"),
    "pretrain-finetune": lambda: Pretrain(small(), head="finetune", finetune_body=True),
}


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_loss_and_meta_gradient_on_cuda_equal_the_cpu(name):
    cpu = LEARNERS[name]()
    gpu = copy.deepcopy(cpu).to(CUDA)
    batch = image_batch(tasks=4, n_way=3, shots=2, queries=3)
    if isinstance(cpu, Pretrain):  # no episodic meta-loss: compare its few-shot evaluation
        a, b = cpu.fine_tune(batch, inner_steps=2), gpu.fine_tune(batch.to(CUDA), inner_steps=2)
        torch.testing.assert_close(b.task_loss.cpu(), a.task_loss, rtol=1e-7, atol=1e-9)
        return
    a, b = cpu.meta_loss(batch, per_step=True), gpu.meta_loss(batch.to(CUDA), per_step=True)
    torch.testing.assert_close(b.loss.cpu(), a.loss, rtol=1e-9, atol=1e-11)
    unused = dict(allow_unused=True)  # ProtoNet leaves conv4's head out
    for x, y in zip(torch.autograd.grad(a.loss, list(cpu.parameters()), **unused),
                    torch.autograd.grad(b.loss, list(gpu.parameters()), **unused)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y.cpu(), x, rtol=1e-7, atol=1e-10)


def test_second_order_maml_on_cuda_matches_the_loop_reference_for_conv4_and_resnet12():
    for model, size in ((small(), 8), (resnet12(1, n_way=3, widths=(2, 3, 3, 4), image_size=16).double(), 16)):
        model = model.to(CUDA)
        batch = image_batch(tasks=2, size=size).to(CUDA)
        out = MAML(model, inner_lr=0.3, inner_steps=2).meta_loss(batch)
        reference, _ = loop_meta_loss(model, batch, 0.3, 2, create_graph=True, per_step=False)
        torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
        for x, y in zip(grads_of(out.loss, model), grads_of(reference, model)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-10)


def test_reptile_step_on_cuda_equals_the_cpu():
    torch.manual_seed(0)
    cpu = Reptile(small(), inner_lr=0.1, inner_steps=3, outer_lr=0.5)
    gpu = copy.deepcopy(cpu).to(CUDA)
    batch = image_batch(tasks=3, n_way=3, shots=2, queries=3)
    for learner, b in ((cpu, batch), (gpu, batch.to(CUDA))):
        learner.train_step(b, learner.make_optimizer(1e-3))
    for x, y in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(y.detach().cpu(), x.detach(), rtol=1e-7, atol=1e-10)


def test_evaluation_with_views_and_an_ensemble_on_cuda_equals_the_cpu():
    batch = image_batch(tasks=3, n_way=3, shots=2, queries=3)
    maml, proto = MAML(small(), inner_lr=0.4, inner_steps=2), ProtoNet(small(), n_way=3)
    augment = RandomAffine(rotation=20)
    cpu = evaluate(maml, [batch], 2, views=3, view_augment=augment, ensemble=[Member(proto, 0, augment)])
    gpu_maml, gpu_proto = copy.deepcopy(maml).to(CUDA), copy.deepcopy(proto).to(CUDA)
    gpu = evaluate(gpu_maml, [batch], 2, device=CUDA, views=3, view_augment=augment,
                   ensemble=[Member(gpu_proto, 0, augment)])
    torch.testing.assert_close(gpu.loss, cpu.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gpu.accuracy, cpu.accuracy)
    plain_cpu, plain_gpu = evaluate(maml, [batch], 2), evaluate(gpu_maml, [batch], 2, device=CUDA)
    torch.testing.assert_close(plain_gpu.loss, plain_cpu.loss, rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    runs = {"maml": root / "maml", "protonet": root / "protonet"}
    for algo, out in runs.items():
        assert main(["train", *TINY_ARGS, "--algo", algo, "--device", "cuda", "--out", str(out)]) == 0
    return runs


def test_a_run_trained_on_cuda_evaluates_alike_on_cuda_and_cpu(gpu_runs, capsys):
    rows = {}
    for device in ("cuda", "cpu"):
        assert main(["eval", str(gpu_runs["maml"]), str(gpu_runs["protonet"]), "--tta", "2", "--device", device,
                     "--quiet"]) == 0
        rows[device] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy")]
    assert rows["cuda"] and rows["cuda"] == rows["cpu"]


def test_predict_on_cuda_equals_the_cpu(gpu_runs, tmp_path):
    support, query = glyph_files(tmp_path, queries=3)
    for views in (1, 3):
        cpu = Predictor.load(gpu_runs["maml"], device="cpu", views=views).adapt(support).predict(query)
        gpu = Predictor.load(gpu_runs["maml"], device="cuda", views=views).adapt(support).predict(query)
        torch.testing.assert_close(gpu.probabilities, cpu.probabilities, rtol=1e-4, atol=1e-5)
    both = PredictorEnsemble.load(list(gpu_runs.values()), device="cuda").adapt(support).predict(query)
    assert both.probabilities.shape == (len(sorted(query.glob("*.png"))), 3)
