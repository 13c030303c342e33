"""The pretrained-embedding baselines (their heads against closed forms and an independent
optimiser), ResNet-12 (shapes, DropBlock, second-order MAML against the loop reference), starting
a learner from another run (--init), one-row evaluation of learners without inner steps, and
test-time augmentation (evaluate's views)."""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

import numpy as np

from fastadapt import MAML, TaskBatch, evaluate
from fastadapt.algorithms.pretrain import Pretrain
from fastadapt.algorithms.protonet import ProtoNet
from fastadapt.cli import main
from fastadapt.data import ClassBatch, ClassBatchSampler, ImageSet, RandomAffine
from fastadapt.evaluate import Member, _views, score_with_views
from fastadapt.experiment import load_init
from fastadapt.models import conv4, resnet12
from fastadapt.models.resnet import DropBlock

from helpers import TINY_ARGS, grads_of, image_batch, loop_meta_loss


class Embedding(torch.nn.Module):
    """A fixed linear embedding, so a head's output can be computed by hand from made-up features."""

    def __init__(self, inputs=6, features=4, classes=7):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, features, bias=False))
        self.features[1].weight.data = torch.randn(features, inputs, generator=g, dtype=torch.float64)
        self.head = torch.nn.Linear(features, classes).double()


def vector_tasks(tasks=3, n_way=4, shots=2, queries=3, inputs=6):
    g = torch.Generator().manual_seed(5)
    return TaskBatch(torch.randn(tasks, n_way * shots, inputs, generator=g, dtype=torch.float64),
                     torch.arange(n_way).repeat_interleave(shots).repeat(tasks, 1),
                     torch.randn(tasks, n_way * queries, inputs, generator=g, dtype=torch.float64),
                     torch.arange(n_way).repeat_interleave(queries).repeat(tasks, 1))


def cl2n(learner, x):
    with torch.no_grad():
        z = learner.model.features(x)
    return F.normalize(z - learner.feature_mean, dim=-1)


def query_features_and_class_means(learner, batch, task, n_way=4):
    """Task ``task``'s CL2N query features and its support classes' mean CL2N features, by hand."""
    zs, zq = cl2n(learner, batch.support_x[task]), cl2n(learner, batch.query_x[task])
    return zq, torch.stack([zs[batch.support_y[task] == c].mean(0) for c in range(n_way)])


def learner_with_centre(head, **kwargs):
    learner = Pretrain(Embedding(), head=head, **kwargs).double()
    learner.feature_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64))
    return learner


def scores(learner, batch, steps=0):
    fast = learner.adapt(batch.support_x, batch.support_y, steps)
    with torch.no_grad():
        return learner.predict(fast, batch.query_x)


def test_centroid_head_is_nearest_mean_of_centred_normalised_features():
    learner, batch = learner_with_centre("centroid"), vector_tasks()
    out = scores(learner, batch)
    for t in range(batch.num_tasks):
        zq, means = query_features_and_class_means(learner, batch, t)
        distances = torch.cdist(zq, means) ** 2
        # logits are -scale * squared distance, up to a constant per query (|zq| = 1)
        expected = -learner.SCALE * distances
        torch.testing.assert_close(out[t] - out[t].mean(1, keepdim=True), expected - expected.mean(1, keepdim=True))


def test_cosine_head_is_scaled_cosine_similarity_to_the_class_means():
    learner, batch = learner_with_centre("cosine"), vector_tasks()
    out = scores(learner, batch)
    for t in range(batch.num_tasks):
        zq, means = query_features_and_class_means(learner, batch, t)
        expected = learner.SCALE * F.cosine_similarity(zq[:, None], means[None], dim=-1)
        torch.testing.assert_close(out[t], expected)


def test_logistic_head_reaches_the_optimum_that_lbfgs_finds():
    learner, batch = learner_with_centre("logistic", logistic_c=2.0), vector_tasks()
    out = scores(learner, batch)
    for t in range(batch.num_tasks):
        zs, ys, zq = cl2n(learner, batch.support_x[t]), batch.support_y[t], cl2n(learner, batch.query_x[t])
        weight = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=500, tolerance_grad=1e-12,
                                      tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def objective():  # scikit-learn's: |W|^2 / 2 + C * sum of cross-entropies, intercept free
            optimiser.zero_grad()
            loss = 0.5 * (weight ** 2).sum() + 2.0 * F.cross_entropy(zs @ weight.T + bias, ys, reduction="sum")
            loss.backward()
            return loss

        optimiser.step(objective)
        expected = zq @ weight.detach().T + bias.detach()
        # the intercept is defined up to a shared constant
        torch.testing.assert_close(out[t] - out[t].mean(1, keepdim=True), expected - expected.mean(1, keepdim=True),
                                   rtol=1e-4, atol=1e-5)


def test_logistic_head_is_vectorised_over_tasks():
    learner, batch = learner_with_centre("logistic"), vector_tasks(tasks=4)
    together = scores(learner, batch)
    alone = torch.cat([scores(learner, batch[t]) for t in range(4)])
    torch.testing.assert_close(together, alone)


def test_finetune_head_starts_at_the_cosine_head_and_lowers_the_support_loss():
    batch = vector_tasks()
    cosine, tuned = learner_with_centre("cosine"), learner_with_centre("finetune", inner_lr=0.5)
    torch.testing.assert_close(scores(tuned, batch, 0), scores(cosine, batch))
    out = tuned.fine_tune(TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y), 5)
    assert out.query_loss.shape == (6,)
    assert (out.query_loss[1:] < out.query_loss[:-1]).all()
    before = {n: p.clone() for n, p in tuned.model.named_parameters()}
    body = tuned.adapt(batch.support_x[0], batch.support_y[0], 3)
    torch.testing.assert_close(body["features.1.weight"], before["features.1.weight"])  # head only by default
    everything = learner_with_centre("finetune", inner_lr=0.5, finetune_body=True)
    moved = everything.adapt(batch.support_x[0], batch.support_y[0], 3)
    assert not torch.allclose(moved["features.1.weight"], before["features.1.weight"])
    for n, p in tuned.model.named_parameters():
        assert torch.equal(p, before[n])


def test_only_the_finetune_head_reports_steps():
    batch = vector_tasks()
    for head, rows in (("centroid", 1), ("logistic", 1), ("cosine", 1), ("finetune", 4)):
        result = evaluate(learner_with_centre(head), [batch], 3)
        assert len(result.accuracy) == rows
        assert ("step" in result.table().splitlines()[1]) == (rows > 1)


def test_protonet_evaluation_prints_one_row():
    model = conv4(1, 3, hidden=4, image_size=8).double()
    result = evaluate(ProtoNet(model, n_way=3), [image_batch()], 5)
    lines = result.table().splitlines()
    assert len(result.accuracy) == 1 and len(lines) == 2 and lines[1].startswith("accuracy ")


def test_test_time_views_that_copy_the_image_change_nothing_and_augmented_views_are_seeded():
    """With views that are exact copies, the enlarged support set has the same class means, loss
    gradient and BatchNorm statistics, and every query the same probabilities: the scores must be
    those of plain evaluation, for ProtoNet and for MAML after its steps."""
    torch.manual_seed(0)
    batch = image_batch(tasks=3, n_way=3, shots=2, queries=3)
    copies = lambda images, generator: images.clone()  # noqa: E731
    for learner, steps in ((ProtoNet(conv4(1, 3, hidden=4, image_size=8).double(), n_way=3), 0),
                           (MAML(conv4(1, 3, hidden=4, image_size=8).double(), inner_lr=0.4, inner_steps=2), 2)):
        plain = learner.fine_tune(batch, inner_steps=steps)
        loss, accuracy = score_with_views(learner, batch, steps, views=3, augment=copies)
        torch.testing.assert_close(loss, plain.task_loss[:, -1])
        torch.testing.assert_close(accuracy, plain.task_accuracy[:, -1])
        before = {n: p.clone() for n, p in learner.state_dict().items()}
        result = evaluate(learner, [batch, batch[0]], steps, views=4, view_augment=RandomAffine(rotation=30))
        again = evaluate(learner, [batch, batch[0]], steps, views=4, view_augment=RandomAffine(rotation=30))
        assert result.tasks == 4 and len(result.accuracy) == 1 and not result.per_step
        assert torch.equal(result.loss, again.loss)
        assert not torch.allclose(result.loss, evaluate(learner, [batch, batch[0]], steps).loss[-1:])
        assert all(torch.equal(before[n], t) for n, t in learner.state_dict().items())
    augment = RandomAffine()
    drawn = np.random.default_rng([7, 0, 1])
    view = _views(batch.support_x, 2, augment, (7, 0))
    torch.testing.assert_close(view[:, :, 0], batch.support_x, rtol=0, atol=0)
    torch.testing.assert_close(view[:, :, 1], augment(batch.support_x.flatten(0, 1), drawn).view_as(batch.support_x))
    evaluate_module = importlib.import_module("fastadapt.evaluate")  # the package names the function evaluate
    whole = evaluate_module.view_probabilities(learner, batch, steps, 4, augment, (3,))
    limit, evaluate_module.PREDICT_IMAGES = evaluate_module.PREDICT_IMAGES, 10  # one task per predict call
    try:
        torch.testing.assert_close(evaluate_module.view_probabilities(learner, batch, steps, 4, augment, (3,)), whole)
    finally:
        evaluate_module.PREDICT_IMAGES = limit
    with pytest.raises(ValueError, match="views must be a positive integer"):
        evaluate(learner, [batch], 1, views=0)
    with pytest.raises(ValueError, match="needs view_augment"):
        evaluate(learner, [batch], 1, views=2)


def linear_protonet(seed, inputs=6, features=4):
    torch.manual_seed(seed)
    return ProtoNet(torch.nn.Linear(inputs, features).double(), n_way=4, embedding=None)


def by_hand_probabilities(learner, batch):
    """ProtoNet's class probabilities on a linear embedding: softmax of minus the squared distances
    of each query's embedding to the class means of the embedded support set."""
    with torch.no_grad():
        zs, zq = learner.model(batch.support_x), learner.model(batch.query_x)
    means = torch.stack([zs[:, batch.support_y[0] == c].mean(1) for c in range(4)], 1)
    return (-((zq[:, :, None] - means[:, None]) ** 2).sum(-1)).softmax(-1)


def test_an_ensemble_averages_its_members_class_probabilities():
    """Two ProtoNets on different linear embeddings: the ensemble's accuracy and loss are those of
    the mean of their probabilities computed by hand; a model ensembled with itself scores as it
    does alone (plain, and with views); members are checked."""
    batch = vector_tasks(tasks=5, shots=1, queries=6)
    a, b = linear_protonet(0), linear_protonet(1)
    mean = (by_hand_probabilities(a, batch) + by_hand_probabilities(b, batch)) / 2
    result = evaluate(a, [batch], 0, ensemble=[Member(b, 0)])
    expected_accuracy = (mean.argmax(-1) == batch.query_y).double().mean(1)
    expected_loss = F.nll_loss(mean.log().flatten(0, 1), batch.query_y.flatten(), reduction="none").view(5, -1).mean(1)
    torch.testing.assert_close(result.accuracy, expected_accuracy.mean()[None])
    torch.testing.assert_close(result.loss, expected_loss.mean()[None])
    assert not result.per_step and len(result.table().splitlines()) == 2
    alone = [(mean_of(evaluate(m, [batch], 0))) for m in (a, b)]
    assert (result.loss.item(), result.accuracy.item()) not in alone
    images = image_batch(tasks=2, n_way=3, shots=2, queries=3)
    maml = MAML(conv4(1, 3, hidden=4, image_size=8).double(), inner_lr=0.4, inner_steps=2)
    plain = evaluate(maml, [images], 2)
    twice = evaluate(maml, [images], 2, ensemble=[Member(maml, 2)])
    torch.testing.assert_close(twice.accuracy, plain.accuracy[-1:])
    torch.testing.assert_close(twice.loss, plain.loss[-1:])
    augment = RandomAffine(rotation=30)
    viewed = evaluate(maml, [images], 2, views=3, view_augment=augment)
    both = evaluate(maml, [images], 2, views=3, view_augment=augment, ensemble=[Member(maml, 2, augment)])
    torch.testing.assert_close(both.loss, viewed.loss)
    with pytest.raises(ValueError, match="has no view_augment"):
        evaluate(maml, [images], 2, views=3, view_augment=augment, ensemble=[Member(maml, 2)])
    with pytest.raises(ValueError, match="member 1 is not a classifier"):
        evaluate(maml, [images], 2, ensemble=[Member(MAML(conv4(1, 3, hidden=4, image_size=8).double(), loss="mse"), 1)])
    with pytest.raises(TypeError, match="must be evaluate.Member"):
        evaluate(maml, [images], 2, ensemble=[maml])


def mean_of(result):
    return result.loss[-1].item(), result.accuracy[-1].item()


def test_cli_eval_of_several_runs_is_an_ensemble_and_refuses_runs_that_cannot_share_tasks(tmp_path, capsys):
    runs = {name: tmp_path / name for name in ("a", "b", "five", "big")}
    for name, extra in (("a", ["--seed", "1"]), ("b", ["--seed", "2"]), ("five", ["--algo", "maml", "--n-way", "5"]),
                        ("big", ["--image-size", "20"])):
        algo = [] if "--algo" in extra else ["--algo", "protonet"]
        assert main(["train", *TINY_ARGS, *algo, *extra, "--steps", "2", "--out", str(runs[name])]) == 0
    capsys.readouterr()
    assert main(["eval", str(runs["a"]), str(runs["b"]), "--episodes", "4", "--tta", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "an ensemble of 2 models" in out and f"{runs['b']}: ProtoNet" in out
    assert "per inner step" not in out and "accuracy " in out
    assert main(["eval", str(runs["a"]), str(runs["five"]), "--episodes", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "5-way model" in err and str(runs["five"]) in err
    assert main(["eval", str(runs["a"]), str(runs["big"]), "--episodes", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "20 px" in err and str(runs["big"]) in err
    assert main(["eval", str(runs["a"]), str(tmp_path / "missing"), "--episodes", "4", "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["eval", str(runs["a"]), str(runs["a"] / "last.pt"), "--episodes", "4", "--quiet"]) == 0
    assert "one checkpoint more than once" not in capsys.readouterr().err  # best.pt and last.pt are two
    assert main(["eval", str(runs["a"]), str(runs["a"]), "--episodes", "4", "--quiet"]) == 0
    assert "one checkpoint more than once" in capsys.readouterr().err
    assert main(["eval", str(runs["a"]), str(runs["b"]), "--head", "logistic", "--episodes", "4", "--quiet"]) == 2
    assert "--head: none of the runs has heads" in capsys.readouterr().err
    assert main(["eval", str(runs["a"]), "--head", "logistic", "--episodes", "4", "--quiet"]) == 2
    assert f"--head: {runs['a']} is a protonet run, which has no heads (pretrain runs have)" in capsys.readouterr().err
    pre = tmp_path / "pre"
    assert main(["train", *TINY_ARGS, "--algo", "pretrain", "--batch-size", "16", "--steps", "2", "--out", str(pre)]) == 0
    capsys.readouterr()
    for head in ("logistic", "finetune"):  # the head is the pretrain run's; ProtoNet has none
        assert main(["eval", str(runs["a"]), str(pre), "--head", head, "--episodes", "4", "--quiet"]) == 0
        out = capsys.readouterr().out
        assert f"{pre}: Pretrain, {'no inner steps' if head == 'logistic' else '2 steps'} at test" in out


def test_pretraining_step_is_classification_and_tracks_running_statistics():
    torch.manual_seed(0)
    model = conv4(1, 6, hidden=4, image_size=8)
    learner = Pretrain(model)
    optimiser = learner.make_optimizer(1e-2)
    g = torch.Generator().manual_seed(2)
    batch = ClassBatch(torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 6, (12,), generator=g))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = F.cross_entropy(model(batch.images), batch.labels)  # plain module: training-mode BatchNorm
    running = model.features[1].running_mean.clone()
    out = learner.train_step(batch, optimiser)
    torch.testing.assert_close(out.loss, expected.detach())
    assert not torch.equal(model.features[1].running_mean, running)
    assert learner.feature_mean.abs().sum() > 0
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters())
    with pytest.raises(TypeError, match="ClassBatch"):
        learner.train_step(image_batch(dtype=torch.float32), optimiser)


def test_pretrained_prediction_of_one_image_equals_prediction_in_a_batch():
    model = conv4(1, 6, hidden=4, image_size=8).double()
    learner = Pretrain(model, head="logistic").double()
    batch = image_batch()
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    with torch.no_grad():
        together = learner.predict(fast, batch.query_x[0])
        alone = torch.cat([learner.predict(fast, batch.query_x[0][i:i + 1]) for i in range(len(batch.query_x[0]))])
    torch.testing.assert_close(together, alone)


def test_class_batches_cover_each_epoch_once_and_are_a_function_of_the_index():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    dataset = ImageSet(images, torch.arange(10) % 3, ["a", "b", "c"])
    sampler = ClassBatchSampler(dataset, batch_size=4, seed=1)
    seen = torch.cat([sampler.batch(i).images[:, 0, 0, 0] for i in range(5)])  # 20 images: two epochs
    assert sorted((seen[:10] * 255).round().long().tolist()) == list(range(10))
    assert sorted((seen[10:] * 255).round().long().tolist()) == list(range(10))
    stream = iter(sampler)
    first = [next(stream) for _ in range(3)]
    resumed = ClassBatchSampler(dataset, batch_size=4, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(next(iter(resumed)).images, sampler.batch(3).images)
    assert torch.equal(first[1].labels, (first[1].images[:, 0, 0, 0] * 255).round().long() % 3)
    with pytest.raises(ValueError, match="batch_size"):
        ClassBatchSampler(dataset, batch_size=0)


# ---------------------------------------------------------------------- ResNet-12
def test_resnet12_shapes_and_parts():
    for size, channels in ((28, 1), (84, 3)):
        net = resnet12(channels, n_way=5, widths=(4, 6, 8, 10), image_size=size)
        x = torch.rand(2, channels, size, size)
        assert net.features(x).shape == (2, 10) and net(x).shape == (2, 5)
    default = resnet12()
    assert [block.conv1.out_channels for block in default.features[:4]] == [64, 160, 320, 640]
    with pytest.raises(ValueError, match="at least 16"):
        resnet12(image_size=8)
    with pytest.raises(ValueError, match="four positive integers"):
        resnet12(widths=(4, 4))


def test_dropblock_drops_about_its_rate_in_training_only():
    torch.manual_seed(0)
    drop = DropBlock(0.2, block_size=3)
    x = torch.ones(64, 8, 10, 10)
    out = drop(x)
    dropped = (out == 0).float().mean().item()
    assert 0.12 < dropped < 0.28
    assert abs(out.mean().item() - 1.0) < 1e-5  # the kept units are rescaled
    drop.eval()
    assert torch.equal(drop(x), x)


def test_resnet12_second_order_maml_matches_the_float64_loop_reference():
    torch.manual_seed(0)
    model = resnet12(1, n_way=3, widths=(2, 3, 3, 4), image_size=16).double()
    batch = image_batch(tasks=2, size=16)
    maml = MAML(model, inner_lr=0.3, inner_steps=2)
    out = maml.meta_loss(batch)
    reference, _ = loop_meta_loss(model, batch, 0.3, 2, create_graph=True, per_step=False)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_of(out.loss, model), grads_of(reference, model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------- --init
def test_init_loads_the_backbone_and_refuses_other_shapes(tmp_path):
    source = conv4(1, 40, hidden=8, image_size=28)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = MAML(conv4(1, 5, hidden=8, image_size=28))
    line = load_init(target, tmp_path / "weights.pt")
    assert "the head is new" in line and "[40, 8]" in line
    for name, value in source.state_dict().items():
        if name.startswith("features."):
            assert torch.equal(target.model.state_dict()[name], value), name
    assert not torch.equal(target.model.head.bias, source.head.bias[:5])
    same = ProtoNet(conv4(1, 40, hidden=8, image_size=28), n_way=5)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    assert "backbone and head" in load_init(same, tmp_path / "ddp.pt")
    assert torch.equal(same.model.head.weight, source.head.weight)
    task_norm = ProtoNet(conv4(1, 40, hidden=8, image_size=28, norm="tasknorm"), n_way=5)
    blends = {n: p.clone() for n, p in task_norm.model.state_dict().items() if n.endswith("blend")}
    assert "TaskNorm's 4 blend weights start as initialised" in load_init(task_norm, tmp_path / "weights.pt")
    assert torch.equal(task_norm.model.features[1].weight, source.features[1].weight)
    assert all(torch.equal(task_norm.model.state_dict()[n], v) for n, v in blends.items())
    with pytest.raises(ValueError, match=r"features.0.weight is \[8, 1, 3, 3\] there but \[16, 1, 3, 3\]"):
        load_init(MAML(conv4(1, 5, hidden=16, image_size=28)), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="none of this network's backbone"):
        load_init(MAML(resnet12(1, 5, widths=(2, 2, 2, 2))), tmp_path / "weights.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_init(target, tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no such run folder or file"):
        load_init(target, tmp_path / "missing")


def test_cli_pretrain_then_protonet_from_it_then_eval_with_each_head(tmp_path, capsys):
    pre, proto = tmp_path / "pre", tmp_path / "proto"
    assert main(["train", *TINY_ARGS, "--algo", "pretrain", "--batch-size", "16", "--steps", "3",
                 "--out", str(pre), "--quiet"]) == 0
    config = json.loads((pre / "config.json").read_text())
    assert config["model"]["outputs"] == 12 and config["algorithm"]["name"] == "pretrain"
    assert main(["train", *TINY_ARGS, "--algo", "protonet", "--init", str(pre), "--steps", "1", "--out", str(proto),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "--init: backbone and head" in out or "--init: backbone (" in out
    state = torch.load(pre / "last.pt", weights_only=True)["model"]
    assert json.loads((proto / "config.json").read_text())["model"]["init"] == str(pre)
    for head in ("logistic", "finetune"):
        assert main(["eval", str(pre), "--head", head, "--episodes", "4", "--quiet"]) == 0
        table = capsys.readouterr().out
        assert ("per inner step" in table) == (head == "finetune")
    assert main(["eval", str(pre), "--inner-steps-test", "3", "--episodes", "4", "--quiet"]) == 0
    assert "--inner-steps-test means nothing for this pretrain run" in capsys.readouterr().err
    assert main(["eval", str(proto), "--tta", "3", "--episodes", "4", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "test-time augmentation: 3 views of each image (RandomAffine(" in table and "per inner step" not in table
    for head in ("centroid", "logistic", "finetune"):
        assert main(["eval", str(pre), "--head", head, "--tta", "2", "--episodes", "4", "--quiet"]) == 0
    assert main(["eval", str(proto), "--tta", "0", "--episodes", "4", "--quiet"]) == 2
    assert "--tta must be a positive integer" in capsys.readouterr().err
    assert main(["eval", str(proto), "--head", "logistic", "--episodes", "4", "--quiet"]) == 2
    assert f"--head: {proto} is a protonet run, which has no heads (pretrain runs have)" in capsys.readouterr().err
    assert "model.features.0.weight" in state


def test_cli_trains_resnet12_and_refuses_conv4_options_for_it(tmp_path, capsys):
    args = [a for a in TINY_ARGS]
    at = args.index("--hidden")
    del args[at:at + 2]
    assert main(["train", *args, "--backbone", "resnet12", "--widths", "2,2,3,3", "--drop-block", "0.1",
                 "--steps", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["widths"] == [2, 2, 3, 3]
    assert main(["eval", str(tmp_path / "r"), "--episodes", "2", "--quiet"]) == 0
    assert main(["train", *TINY_ARGS, "--backbone", "resnet12", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--hidden is conv4's" in capsys.readouterr().err
    assert main(["train", *args, "--widths", "2,x", "--out", str(tmp_path / "y")]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err
