"""The architecture's promises: an algorithm is one file, the configuration is typed and checked in
API terms, classification is declared, old names keep working, and the layers import downwards."""

import ast
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastadapt
from fastadapt import MAML, MAMLPlusPlus, RunConfig, Trainer, experiment
from fastadapt.algorithms import MetaLearner, registered
from fastadapt.checkpoint import load_checkpoint
from fastadapt.cli import build_parser, main
from fastadapt.config import ConfigError, Option
from fastadapt.models import mlp
from helpers import TINY_ARGS, image_batch, small_conv4

SRC = Path(fastadapt.__file__).parent


class SignSGD(MetaLearner):
    """A toy first-order algorithm, defined here and nowhere else: each inner step moves every
    weight by ``inner_lr * scale`` against the sign of its gradient."""

    name = "toy-signsgd"
    summary = "a test's toy algorithm"
    options = (Option("sign_scale", float, "the toy's step multiplier", positive=True),)

    @classmethod
    def from_config(cls, model, config):
        a = config.algorithm
        return cls(model, a.inner_lr, a.inner_steps, config.loss, a.options.get("sign_scale") or 1.0)

    def __init__(self, model, inner_lr, inner_steps, loss, sign_scale=1.0):
        super().__init__(model, inner_steps=inner_steps, loss=loss)
        self.inner_lr, self.sign_scale = inner_lr, sign_scale

    def create_graph(self):
        return False

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        fast = params
        yield fast
        for _ in range(steps):
            grads = self.support_grad(fast, buffers, support_x, support_y, create_graph=False)
            fast = {n: w - self.inner_lr * self.sign_scale * grads[n].sign() for n, w in fast.items()}
            yield fast


TINY = dict(dataset="glyphs", glyph_classes=12, hidden=8, n_way=3, k_shot=1, k_query=2, task_batch=2,
            inner_steps=1, inner_steps_test=2, meta_steps=4, eval_every=2, log_every=2, val_episodes=4,
            test_episodes=4, eval_batch=2)


def test_an_algorithm_in_one_file_is_registered_configured_trained_and_evaluated(tmp_path, capsys):
    assert registered()["toy-signsgd"] is SignSGD
    config = experiment.resolve(dict(TINY, algo="toy-signsgd", sign_scale=0.5))
    learner = experiment.build_learner(config)
    assert isinstance(learner, SignSGD) and learner.sign_scale == 0.5
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    sources = experiment.build_data(config, splits=("train", "val"))
    Trainer(learner, sources["train"], config, tmp_path / "api", sources["val"]).fit(progress=False)
    assert any(not torch.equal(before[n], p) for n, p in learner.named_parameters())
    stored = load_checkpoint(tmp_path / "api" / "last.pt")["config"]["algorithm"]
    assert stored["name"] == "toy-signsgd" and stored["options"] == {"sign_scale": 0.5}
    # the command line takes its name and its option's flag, and rebuilds it to evaluate
    run = tmp_path / "cli"
    assert main(["train", *TINY_ARGS, "--algo", "toy-signsgd", "--sign-scale", "0.25", "--out", str(run)]) == 0
    assert load_checkpoint(run / "last.pt")["config"]["algorithm"]["options"] == {"sign_scale": 0.25}
    assert main(["eval", str(run), "--quiet"]) == 0
    assert "4 test tasks" in capsys.readouterr().out
    assert main(["train", *TINY_ARGS, "--algo", "toy-signsgd", "--sign-scale", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--sign-scale must be a positive finite number, got -1.0" in capsys.readouterr().err
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    algo_help = next(a.help for a in train._actions if a.dest == "algo")  # argparse may wrap at the hyphen
    assert "toy-signsgd: a test's toy algorithm" in algo_help and "--sign-scale" in train.format_help()


def test_configuration_errors_name_the_field_in_api_terms_and_the_flag_on_the_command_line(tmp_path, capsys):
    for values, message in ((dict(steps=0), "TrainingConfig.meta_steps must be a positive integer, got 0"),
                            (dict(inner_lr=float("nan")), "AlgorithmConfig.inner_lr must be a positive finite"),
                            (dict(n_way=1.5), "DataConfig.n_way must be a positive integer, got 1.5"),
                            (dict(dtype="float16"), "ModelConfig.dtype must be float32 or float64"),
                            (dict(algo="maml", outer_lr=2.0), "AlgorithmConfig.options['outer_lr'] is neither a field"),
                            (dict(algo="nope"), "AlgorithmConfig.name must be one of")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            experiment.resolve(values)
    assert main(["train", *TINY_ARGS, "--steps", "0"]) == 2
    assert "error: --steps must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="TrainingConfig.meta_lr"):
        Trainer(MAML(mlp(), inner_lr=0.01, loss="mse"), fastadapt.Sinusoid(5, 5), dict(meta_lr=-1.0))


def test_configuration_round_trips_and_reads_older_flat_checkpoints():
    config = experiment.resolve(dict(TINY, algo="reptile", outer_lr=0.5))
    assert isinstance(config, RunConfig) and config.training.meta_steps == 4 and config.model.hidden == 8
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.flat()["algo"] == "reptile" and config.flat()["outer_lr"] == 0.5
    # a checkpoint written before the typed configuration stored one flat dict with "steps" and "algo"
    old = dict(TINY, algo="maml", lslr=True, meta_lr=0.01, device="cpu")
    old["steps"] = old.pop("meta_steps")
    restored = experiment.stored_config(old)
    assert (restored.training.meta_steps, restored.algorithm.name, restored.algorithm.options) == (4, "maml",
                                                                                                     {"lslr": True})
    learner = experiment.build_learner(experiment.resolve(restored))
    assert isinstance(learner, MAMLPlusPlus) and learner.step_lrs is not None and not learner.per_step_bn
    # and it held every algorithm's options, at their defaults where the run did not use them
    # (the keys and values of 0.1.0 checkpoints' configurations); there, a false or zero MAML++
    # option meant "unset", which --algo mamlpp turns on
    every_option = dict(outer_lr=1.0, multi_step_loss=0, lslr=False, first_order_until=0, per_step_bn=False,
                        bn_statistics="batch")
    for algo, kept in (("protonet", {}), ("reptile", {"outer_lr": 1.0}),
                       ("maml", {"lslr": True, "bn_statistics": "batch"}), ("mamlpp", {"bn_statistics": "batch"})):
        stored = dict(old, algo=algo, **{**every_option, "lslr": algo == "maml"})
        restored = experiment.resolve(experiment.stored_config(stored))
        assert restored.algorithm.options == kept
    learner = experiment.build_learner(restored)
    assert learner.step_lrs is not None and learner.per_step_bn and learner.first_order_until > 0


def test_mamlpp_turns_every_option_on_and_each_can_be_turned_off():
    on = experiment.build_learner(experiment.resolve(dict(TINY, algo="mamlpp", meta_steps=30)))
    assert (on.multi_step_loss, on.first_order_until, on.step_lrs is not None, on.per_step_bn) == (3, 10, True, True)
    off = experiment.build_learner(experiment.resolve(dict(TINY, algo="mamlpp", lslr=False, per_step_bn=False)))
    assert off.step_lrs is None and not off.per_step_bn and off.multi_step_loss == 1
    args = build_parser().parse_args(["train", "--algo", "mamlpp", "--no-lslr"])
    assert args.lslr is False
    # schedules in iterations cannot follow a budget in seconds: say so when they are left to default
    with pytest.warns(UserWarning, match="first_order_until default to fractions of meta_steps"):
        experiment.build_learner(experiment.resolve(dict(TINY, algo="mamlpp", meta_steps=10**6, budget=60)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experiment.build_learner(experiment.resolve(dict(TINY, algo="mamlpp", meta_steps=10**6, budget=60,
                                                         multi_step_loss=50, first_order_until=100)))


def test_classification_is_declared_not_guessed():
    def smooth_cross_entropy(logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=0.1)

    with pytest.raises(ValueError, match="custom loss needs classification=True"):
        MAML(small_conv4(), inner_steps=1, loss=smooth_cross_entropy)
    batch = image_batch()
    custom = MAML(small_conv4(), inner_steps=1, loss=smooth_cross_entropy, classification=True)
    out = custom.fine_tune(batch, inner_steps=1)
    assert out.task_accuracy is not None and out.task_accuracy.shape == (3, 2)
    regression = MAML(mlp(), inner_steps=1, loss=lambda a, b: (a - b).abs().mean(), classification=False)
    assert regression.fine_tune(fastadapt.Sinusoid(5, 5).sample(2), steps=1).query_accuracy is None
    assert MAML(small_conv4(), loss=F.cross_entropy).classification and not MAML(mlp(), loss="mse").classification


def test_old_names_still_work():
    model = small_conv4()
    with pytest.warns(DeprecationWarning, match="MAMLPlusPlus"):
        learner = MAML(model, inner_lr=0.4, inner_steps=2, per_step_bn=True, lslr=True)
    assert type(learner) is MAMLPlusPlus and learner.per_step_bn
    assert learner.step_lrs.shape == (2, len(list(model.parameters())))
    assert type(MAML(small_conv4())) is MAML
    from fastadapt.algorithms import batch_statistics
    model.train()
    running = model.features[1].running_mean.clone()
    with batch_statistics(model):
        model(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    assert torch.equal(model.features[1].running_mean, running)
    # fine_tune and adapt once took the inner step count as ``steps``
    maml, batch = MAML(small_conv4(), inner_steps=1), image_batch()
    torch.testing.assert_close(maml.fine_tune(batch, steps=2).task_loss, maml.fine_tune(batch, inner_steps=2).task_loss)
    assert maml.fine_tune(batch, steps=2).task_loss.shape == (3, 3)
    with pytest.raises(ValueError, match="give one"):
        maml.adapt(batch.support_x[0], batch.support_y[0], inner_steps=1, steps=2)


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, []


def _package_imports(path: Path):
    """The fastadapt modules ``path`` (one level below the package) imports, by top-level name."""
    for level, module, names in _imports(path):
        if level >= 2:
            yield module.split(".")[0] or names[0], names
        elif module.startswith("fastadapt."):
            yield module.split(".")[1], names


def test_layers_import_downwards_and_algorithms_use_no_private_engine_names():
    for path in (SRC / "algorithms").glob("*.py"):
        for top, _ in _package_imports(path):
            assert top in ("config",), (path.name, top)
        for level, module, names in _imports(path):
            if level == 1 and module == "engine":
                assert not [n for n in names if n.startswith("_")], (path.name, names)
    for path in (SRC / "data").glob("*.py"):
        assert not [top for top, _ in _package_imports(path) if top in ("models", "algorithms", "train")], path.name
    assert not [m for _, m, _ in _imports(SRC / "config.py") if m not in ("__future__", "dataclasses", "math", "typing")]
    for path in SRC.glob("*.py"):  # the version has its own module: nothing imports it from the package
        assert not [n for level, m, n in _imports(path) if level == 1 and m == "" and "__version__" in n], path.name
    tests = Path(__file__).parent
    for path in tests.glob("test_*.py"):
        bad = [m for _, m, _ in _imports(path) if m.startswith(("test_", "conftest", "reference"))]
        assert not bad, (path.name, bad)


# ---------------------------------------------------------------------------- the engine's hooks
class CountingMAML(MAML):
    """MAML that counts the meta-batches ``before_meta_batch`` is told of (unregistered: no name)."""

    seen = 0

    def before_meta_batch(self, batch):
        self.seen += batch.num_tasks


def test_before_meta_batch_is_called_once_per_training_meta_batch_and_not_at_test_time():
    learner, batch = CountingMAML(small_conv4(), inner_steps=1), image_batch()
    learner.meta_backward(batch)
    learner.meta_loss(batch)
    assert learner.seen == 2 * batch.num_tasks
    learner.fine_tune(batch, inner_steps=1)
    learner.eval()
    learner.meta_loss(batch)
    assert learner.seen == 2 * batch.num_tasks


class ScaledOutput(MAML):
    """MAML whose adapted task output is scaled by 3: ``task_output`` is what is scored and predicted."""

    def task_output(self, fast, buffers, x):
        return 3 * self.forward_with(fast, buffers, x)


def test_task_output_is_what_the_query_loss_and_predict_score():
    model, batch = small_conv4(), image_batch()
    plain, scaled = MAML(model, inner_steps=1), ScaledOutput(model, inner_steps=1)
    fast = plain.adapt(batch.support_x[0], batch.support_y[0])
    query = batch.query_x[0]
    torch.testing.assert_close(scaled.predict(fast, query), 3 * plain.predict(fast, query))
    expected = F.cross_entropy(3 * plain.predict(fast, query), batch.query_y[0])
    torch.testing.assert_close(scaled.meta_loss(batch[:1]).loss, expected)


def test_default_train_step_is_backward_then_before_update_then_clip_then_step():
    model, batch = small_conv4(), image_batch()
    learner = MAML(model, inner_steps=1)
    reference = MAML(small_conv4(), inner_steps=1)
    reference.load_state_dict(learner.state_dict())
    optimizer, expected_optimizer = torch.optim.SGD(learner.parameters(), lr=0.1), None
    seen = []

    def before_update(out):  # the gradient is there, the weights not yet changed
        seen.append((float(out.loss), [p.grad.clone() for p in learner.parameters()],
                     [p.detach().clone() for p in learner.parameters()]))

    out = learner.train_step(batch, optimizer, clip_grad=1e-3, before_update=before_update)
    expected_out = reference.meta_backward(batch)
    expected_grads = [p.grad.clone() for p in reference.parameters()]
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)
    expected_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected_optimizer.step()
    torch.testing.assert_close(out.loss, expected_out.loss)
    loss, grads, weights = seen[0]
    assert loss == float(expected_out.loss)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    for w, p in zip(weights, reference.parameters()):  # before_update saw the weights before the step
        assert not torch.equal(w, p.detach())
    for a, b in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    # an error in before_update (the Trainer's divergence guard) stops the update
    before = [p.detach().clone() for p in learner.parameters()]

    def refuse(out):
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        learner.train_step(batch, optimizer, before_update=refuse)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))


class HalfStep(MetaLearner):
    """A toy algorithm whose update is not a gradient step: ``train_step`` halves every weight."""

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        for _ in range(steps + 1):
            yield params

    def train_step(self, batch, optimizer, *, per_step=False, clip_grad=None, before_update=None):
        out = self.fine_tune(batch, inner_steps=0)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(0.5)
        return out


def test_an_algorithm_s_own_train_step_is_what_the_trainer_runs(tmp_path):
    learner = HalfStep(small_conv4(torch.float32), inner_steps=0)
    before = [p.detach().clone() for p in learner.parameters()]
    sampler = fastadapt.data.EpisodeSampler(fastadapt.data.Glyphs(6, image_size=8, examples_per_class=3), 3, 1, 1,
                                            batch_size=2)
    Trainer(learner, sampler, dict(meta_steps=3, eval_every=10, log_every=1), tmp_path / "run").fit(progress=False)
    for b, p in zip(before, learner.parameters()):
        torch.testing.assert_close(p.detach(), b / 8)


def test_extensions_route_their_options_and_the_old_spelling_warns():
    from fastadapt.algorithms import registry
    assert MAMLPlusPlus in registry.extensions_of("maml") and MAMLPlusPlus in registry.extensions_of("fomaml")
    assert {"lslr", "per_step_bn"} <= {o.name for o in MAML.accepted_options()}
    first = experiment.build_learner(experiment.resolve(dict(TINY, algo="fomaml", lslr=True)))
    assert type(first) is MAMLPlusPlus and first.first_order and first.step_lrs is not None
    assert type(experiment.build_learner(experiment.resolve(dict(TINY, algo="maml")))) is MAML
    with pytest.warns(DeprecationWarning, match="MAMLPlusPlus"):
        assert type(MAML(small_conv4(), lslr=True)) is MAMLPlusPlus
    with pytest.raises(TypeError):
        MAML(small_conv4(), no_such_option=1)
    maml_source = (SRC / "algorithms" / "maml.py").read_text()
    assert "mamlpp" not in maml_source and "MAMLPlusPlus" not in maml_source


def test_use_classes_accepts_any_number_for_prototypes_and_refuses_another_output_size():
    from fastadapt.algorithms import ProtoNet
    maml = MAML(small_conv4(), inner_steps=1)
    assert maml.output_classes() == 3
    maml.use_classes(3)
    with pytest.raises(ValueError, match="the tasks are 20-way, but this is a 3-way model"):
        maml.use_classes(20)
    protonet = ProtoNet(small_conv4(), n_way=3)
    assert protonet.output_classes() is None
    protonet.use_classes(20)
    assert protonet.n_way == 20


# ---------------------------------------------------------------------------- a data set in one file
class Stripes(fastadapt.data.DataSource):
    """A toy data set, defined here and nowhere else: class c is a bright horizontal stripe at row
    ``c * stripe_gap`` of a 12x12 image, with noise."""

    name = "toy-stripes"
    summary = "a test's toy data set"
    options = (Option("stripe_gap", int, "the toy's rows between stripes", positive=True),)
    needs_root = False
    image_size = 12

    @classmethod
    def build_sets(cls, config):
        gap = config.data.options.get("stripe_gap") or 1
        sets = []
        for split, seed in (("train", 0), ("val", 1), ("test", 2)):
            g = torch.Generator().manual_seed(seed)
            images = torch.randint(0, 60, (6 * 4, 1, 12, 12), generator=g, dtype=torch.uint8)
            targets = torch.arange(6).repeat_interleave(4)
            for index, c in enumerate(targets.tolist()):
                images[index, 0, (c * gap) % 12] = 255
            sets.append(fastadapt.data.ImageSet(images, targets, [f"{split}{c}" for c in range(6)],
                                                fastadapt.data.ImageTransform(12, 1)))
        return tuple(sets)


def test_a_data_set_in_one_file_is_registered_configured_and_trained_from_the_command_line(tmp_path, capsys):
    assert fastadapt.data.source("toy-stripes") is Stripes
    tiny = {k: v for k, v in TINY.items() if k != "glyph_classes"}
    config = experiment.resolve(dict(tiny, dataset="toy-stripes", stripe_gap=2))
    assert config.data.options == {"stripe_gap": 2} and config.data.image_size == 12
    assert experiment.build_data(config, splits=("train",))["train"].dataset.images.shape == (24, 1, 12, 12)
    run = tmp_path / "stripes"
    args = ["train", *TINY_ARGS, "--dataset", "toy-stripes", "--stripe-gap", "2", "--out", str(run)]
    args.remove("--glyph-classes"), args.remove("12")
    assert main(args) == 0
    stored = load_checkpoint(run / "last.pt")["config"]["data"]
    assert stored["dataset"] == "toy-stripes" and stored["options"] == {"stripe_gap": 2}
    assert main(["eval", str(run), "--quiet"]) == 0
    assert "4 test tasks" in capsys.readouterr().out
    assert main([*args[:-2], "--stripe-gap", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--stripe-gap must be a positive integer, got 0" in capsys.readouterr().err
    # another data set's option is refused by name
    with pytest.raises(ConfigError, match=r"DataConfig.options\['stripe_gap'\] is not an option of data set 'glyphs'"):
        experiment.resolve(dict(TINY, stripe_gap=2))
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "toy-stripes: a test's toy data set" in help_text and "--stripe-gap" in help_text


def test_every_flag_takes_its_underscore_spelling_and_help_is_grouped():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and "-" in flag[2:] and action.nargs is None and action.type in (int, float):
                value = "3"
                assert getattr(train.parse_args([flag.replace("-", "_").replace("__", "--", 1), value]),
                               action.dest) == getattr(train.parse_args([flag, value]), action.dest), flag
    args = parser.parse_args(["train", "--eval_every", "7", "--k_spt=2", "--no_lslr", "--first_order"])
    assert (args.eval_every, args.k_shot, args.lslr, args.first_order) == (7, 2, False, True)
    assert parser.parse_args(["eval", "RUN", "--inner_steps_test", "4"]).inner_steps_test == 4
    titles = [group.title for group in train._action_groups]
    for title in ("data", "episode shape", "algorithm", "model", "training", "checkpoints and stopping", "devices"):
        assert title in titles, title
    resume = next(a for a in train._actions if a.dest == "resume").help
    from fastadapt.cli import common
    for key in common.RESUME_OVERRIDES:
        flag = next(a for a in train._actions if a.dest == key).option_strings[0]
        assert flag in resume, (flag, resume)


def test_the_command_line_names_no_algorithm():
    names = set(registered())
    for path in (SRC / "cli").glob("*.py"):
        strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not names & strings, (path.name, names & strings)


def test_a_nested_checkpoint_from_before_data_set_options_loads(tmp_path):
    config = experiment.resolve(dict(TINY, algo="maml"))
    old = config.to_dict()
    old["data"].pop("options")
    old["data"].update(train_alphabets=None, val_alphabets=None, test_alphabets=None, rotations=False,
                       protocol=None, glyph_classes=12)
    restored = experiment.resolve(experiment.stored_config(old))
    assert restored.data.options == {"glyph_classes": 12} and restored == config
    learner = experiment.build_learner(config)
    path = fastadapt.checkpoint.save_checkpoint({"model": learner.state_dict(), "config": old, "step": 3},
                                                tmp_path / "old.pt")
    run = experiment.load_run(path, device="usable")
    assert run.config == config and run.state["step"] == 3
    for a, b in zip(run.learner.parameters(), learner.parameters()):
        assert torch.equal(a, b)
