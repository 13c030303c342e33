"""Trainer, evaluation, checkpoints and the command line, on tiny settings."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastadapt import experiment
from fastadapt.checkpoint import load_checkpoint, save_checkpoint
from fastadapt.cli import main
from fastadapt.data import Glyphs
from fastadapt.evaluate import confidence_interval, evaluate
from fastadapt.train import Trainer, TrainingDiverged
from helpers import TINY_ARGS, InterruptAfter, shared_data, write_png

TINY = dict(dataset="glyphs", glyph_classes=12, hidden=8, n_way=3, k_shot=1, k_query=2, task_batch=2,
            inner_steps=1, inner_steps_test=2, steps=6, eval_every=3, log_every=2, val_episodes=4,
            test_episodes=4, eval_batch=2, cosine=True, clip_grad=10.0)
def test_confidence_interval_formula():
    values = torch.tensor([[0.2, 1.0], [0.4, 1.0], [0.9, 1.0], [0.5, 1.0]])
    expected = 1.96 * np.std(values.numpy(), axis=0, ddof=1) / math.sqrt(4)
    torch.testing.assert_close(confidence_interval(values), torch.tensor(expected, dtype=torch.float64))


def make_trainer(out_dir, config=None, tasks=None):
    c = experiment.resolve({**TINY, **(config or {})})
    torch.manual_seed(c.training.seed)
    learner = experiment.build_learner(c)
    sources = experiment.build_data(c, splits=("train", "val"))
    return Trainer(learner, tasks or sources["train"], c, out_dir, sources["val"])


def test_evaluate_is_deterministic_and_leaves_model_unchanged(tmp_path):
    trainer = make_trainer(None)
    c = trainer.config
    tasks = experiment.build_data(c, splits=("test",))["test"]
    again = experiment.build_data(c, splits=("test",))["test"]
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    a, b = evaluate(trainer.learner, tasks, 3), evaluate(trainer.learner, again, 3)
    assert a.tasks == 4 and a.accuracy.shape == (4,)
    assert torch.equal(a.accuracy, b.accuracy) and torch.equal(a.loss_ci, b.loss_ci)
    assert all(torch.equal(v, trainer.learner.state_dict()[k]) for k, v in before.items())
    assert "95% confidence interval" in a.table()


def test_resume_ends_bit_identical_to_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a").fit(progress=False)
    interrupted = make_trainer(tmp_path / "b")
    interrupted.tasks = InterruptAfter(interrupted.tasks, 4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(progress=False)
    assert load_checkpoint(tmp_path / "b")["step"] == 4
    resumed = make_trainer(tmp_path / "b")
    resumed.resume(tmp_path / "b" / "last.pt")
    resumed.fit(progress=False)
    final_a, final_b = straight.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert len(records[0]["accuracy"]) == 2 and "examples_per_s" in records[0]
    assert (tmp_path / "a" / "best.pt").is_file()


def test_cosine_follows_the_closed_form_and_a_budget_ends_the_run_normally(tmp_path):
    trainer = make_trainer(None, {"steps": 6, "eval_every": 100})
    rates = []
    real_on_step = trainer.learner.on_step

    def recording_on_step(step):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return real_on_step(step)

    trainer.learner.on_step = recording_on_step
    trainer.fit(progress=False)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=trainer.config.training.meta_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=6)
    expected = []
    for _ in range(6):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        cosine.step()
    np.testing.assert_allclose(rates, expected, rtol=1e-9, atol=1e-15)

    # a budget ends the run after the iteration that spends it, validates there, and the cosine
    # follows the budget when it ends first
    budgeted = make_trainer(tmp_path / "budget", {"steps": 1000, "eval_every": 1000, "budget": 1e-9})
    budgeted.fit(progress=False)
    assert budgeted.step == 1 and budgeted.finished() and budgeted.budget_used > 0
    assert budgeted.optimizer.param_groups[0]["lr"] == 0.0
    records = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val" in r] == [1]
    assert load_checkpoint(tmp_path / "budget")["budget_used"] == budgeted.budget_used
    half = make_trainer(None, {"steps": 1000, "budget": 10.0})
    half.budget_used = 5.0
    assert half._cosine_factor(100) == pytest.approx(0.5)  # half the budget spent, a tenth of the steps
    assert half._cosine_factor(900) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    with pytest.raises(ValueError, match="budget must be a positive"):
        experiment.resolve({**TINY, "budget": 0})


def test_budget_from_the_command_line_tests_the_run_and_resume_keeps_what_was_spent(tmp_path, capsys):
    args = [a for a in TINY_ARGS if a != "--quiet"]
    out = tmp_path / "run"
    assert main(["train", *args, "--epoch", "100000", "--budget", "0.5", "--eval-every", "100000", "--quiet",
                 "--out", str(out)]) == 0
    state = load_checkpoint(out / "last.pt")
    assert 0 < state["step"] < 100000 and state["budget_used"] >= 0.5
    assert (out / "test.json").is_file() and "test" in capsys.readouterr().out.lower()
    # the budget is spent: a resume has nothing left to do and keeps the step
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == state["step"]


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    real = trainer.tasks

    class PoisonAfter(InterruptAfter):
        def __iter__(self):
            for i, batch in enumerate(real):
                if i == self.n:
                    batch.query_x[:] = float("nan")
                yield batch

    trainer.tasks = PoisonAfter(real, 3)
    with pytest.raises(TrainingDiverged, match="at step 4"):
        trainer.fit(progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_checkpoint_is_atomic_and_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"a": 1}}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "config": {}, "payload": Glyphs}, unsafe)
    with pytest.raises(ValueError, match="refused: it holds Python objects .*Glyphs"):
        load_checkpoint(unsafe)
    text = tmp_path / "notes.pt"  # a file of another kind is not called a pickle of objects
    text.write_text("garbage, not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.pt: cannot be read as a PyTorch checkpoint .*no pickle"):
        load_checkpoint(text)



def test_cli_train_eval_predict_plot(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "4 test tasks" in out and (run / "last.pt").is_file() and (run / "test.json").is_file()
    assert load_checkpoint(run)["config"]["data"]["k_shot"] == 1
    timing = json.loads((run / "test.json").read_text())
    assert 0 < timing["meta_iteration_seconds"] * 4 <= timing["train_seconds"]  # 4 steps, validation excluded

    assert main(["eval", str(run), "--episodes", "6", "--inner-steps-test", "1"]) == 0
    table = capsys.readouterr().out
    assert "6 test tasks" in table and table.strip().splitlines()[-1].split()[0] == "1"

    glyphs = Glyphs(num_classes=3, examples_per_class=3, split="test")
    for c in range(3):
        for e in range(3):
            image = 255 - glyphs.images[3 * c + e, 0].numpy()
            folder = tmp_path / ("support" if e == 0 else "query")
            write_png(folder / f"class{c}" / f"{e}.png", image)
    assert main(["predict", str(run), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query"), "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,label,probability" and len(lines) == 7
    assert all(line.split(",")[1] in {"class0", "class1", "class2"} for line in lines[1:])

    pytest.importorskip("matplotlib")
    assert main(["plot", str(run)]) == 0
    assert (run / "learning_curves.png").stat().st_size > 1000 and (run / "inner_steps.png").is_file()


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["train", "--dataset", "omniglot", "--root", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastadapt train: error:") and "images_background" in err and "\n" not in err
    assert main(["train", "--dataset", "omniglot", "--quiet"]) == 2
    assert "--root is needed" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, "--n-way", "0"]) == 2
    assert "--n-way must be a positive integer" in capsys.readouterr().err


def test_predict_rejects_wrong_class_count_and_channels(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--epoch", "1", "--out", str(run)]) == 0
    grey = np.full((28, 28), 128, dtype=np.uint8)
    for c in range(2):
        write_png(tmp_path / "two" / f"c{c}" / "0.png", grey)
    write_png(tmp_path / "query" / "q.png", grey)
    assert main(["predict", str(run), "--support", str(tmp_path / "two"), "--query", str(tmp_path / "query")]) == 2
    assert "the support set has 2 classes, but the model is 3-way" in capsys.readouterr().err
    for c in range(3):
        write_png(tmp_path / "three" / f"c{c}" / "0.png", grey)
    write_png(tmp_path / "colour" / "q.png", np.zeros((28, 28, 3), dtype=np.uint8))
    assert main(["predict", str(run), "--support", str(tmp_path / "three"), "--query", str(tmp_path / "colour")]) == 2
    assert "q.png: image has 3 channel(s)" in capsys.readouterr().err


def test_seed_aliases_and_presets_fill_the_config():
    from fastadapt.cli import build_parser, train_config
    c = train_config(["--preset", "omniglot-20w1s", "--root", "x", "--update-lr", "0.2", "--imgsz", "28", "--imgc", "1"])
    d, a = c.data, c.algorithm
    assert (d.n_way, a.inner_steps, d.task_batch, a.inner_lr, c.training.meta_steps) == (20, 5, 16, 0.2, 60000)
    assert d.options["protocol"] == "maml" and d.options["rotations"] is True
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "Finn, Abbeel and Levine" in help_text


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastadapt", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--k-spt" in result.stdout


def test_trainer_logs_scalars_to_a_writer(tmp_path):
    class Recorder:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, float(value), step))

    trainer = make_trainer(tmp_path)
    trainer.writer = Recorder()
    trainer.fit(progress=False)
    tags = {(tag, step) for tag, _, step in trainer.writer.scalars}
    assert {("train/loss", 2), ("train/accuracy", 6), ("val/accuracy", 3), ("val/loss", 6)} <= tags


def test_tensorboard_flag_without_tensorboard_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["train", *TINY_ARGS, "--tensorboard", "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'fastadapt[tensorboard]'" in capsys.readouterr().err


def test_cli_trains_on_real_omniglot_minimal_sets(tmp_path, capsys):
    root = shared_data("omniglot/images_background_small2.zip").parent
    shared_data("omniglot/images_background_small1.zip")
    args = ["train", "--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
            "--train-alphabets", "Greek,Latin", "--val-split", "background_small2", "--val-alphabets",
            "Japanese_(katakana),Tagalog", "--hidden", "8", "--n-way", "3", "--k-query", "2", "--task-batch", "2",
            "--inner-steps", "1", "--steps", "2", "--val-episodes", "4", "--test-episodes", "4", "--quiet",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "4 test tasks" in capsys.readouterr().out
    config = load_checkpoint(tmp_path / "run")["config"]
    assert config["data"]["options"]["val_alphabets"] == "Japanese_(katakana),Tagalog" and config["data"]["channels"] == 1


def test_a_test_set_that_is_the_validation_set_is_said_plainly(tmp_path, capsys):
    root = shared_data("omniglot/images_background_small2.zip").parent
    shared_data("omniglot/images_background_small1.zip")
    args = ["train", "--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
            "--val-split", "background_small2", "--hidden", "8", "--n-way", "3", "--k-query", "2", "--task-batch",
            "2", "--inner-steps", "1", "--steps", "2", "--val-episodes", "2", "--test-episodes", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "same")]) == 0
    captured = capsys.readouterr()
    assert "no test split of its own: the test tasks come from the validation split 'background_small2'" in captured.err
    assert "on the validation classes (no test split of its own)" in captured.out
    assert json.loads((tmp_path / "same" / "test.json").read_text())["test_is_validation"] is True
    assert main([*args, "--test-split", "background_small2", "--test-alphabets", "Sanskrit",
                 "--val-alphabets", "Tagalog", "--out", str(tmp_path / "own")]) == 0
    captured = capsys.readouterr()
    assert "no test split of its own" not in captured.err + captured.out
    assert "test_is_validation" not in json.loads((tmp_path / "own" / "test.json").read_text())


def test_runs_made_in_python_work_from_the_command_line(tmp_path, capsys):
    import fastadapt
    from fastadapt.cli import main
    from fastadapt.data import EpisodeSampler, Glyphs
    from fastadapt.models import conv4
    maml = fastadapt.MAML(conv4(1, 4, hidden=8), inner_lr=0.4, inner_steps=1)   # not the config's 5-way, 64 wide
    train = EpisodeSampler(Glyphs(20, split="train"), 3, 1, 2, batch_size=2)   # 3-way episodes on a 4-way head
    val = EpisodeSampler(Glyphs(10, split="val"), 3, 1, 2, batch_size=2).fixed(1)
    run = tmp_path / "api"
    config = dict(meta_lr=1e-3, meta_steps=2, eval_every=2, log_every=1, inner_steps_test=1, n_way=3, k_query=2,
                  val_episodes=2, test_episodes=2, glyph_classes=20)
    fastadapt.Trainer(maml, train, config, out_dir=run, val_tasks=val).fit(progress=False)
    stored = load_checkpoint(run / "last.pt")["config"]
    assert (stored["model"]["hidden"], stored["model"]["outputs"], stored["data"]["n_way"]) == (8, 4, 3)
    assert main(["eval", str(run), "--quiet"]) == 0
    assert "2 test tasks" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 3

    class Tiny(torch.nn.Module):   # a network of the user's own: the CLI cannot rebuild it, and says so
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(784, 3)

        def forward(self, x):
            return self.head(x.flatten(1))

    own = tmp_path / "own"
    fastadapt.Trainer(fastadapt.MAML(Tiny(), inner_steps=1), train, config, out_dir=own).fit(progress=False)
    for command in (["eval", str(own)], ["train", "--resume", str(own)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a network of your own" in err[0] and "Tiny" in err[0], err


def test_a_folder_run_predicts_on_files_like_its_own_training_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            for i in range(4):
                write_png(tmp_path / "data" / split / f"{split}{c}" / f"{i}.png",
                          rng.integers(0, 255, (20, 20), dtype=np.uint8))   # grey files, read as RGB
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(tmp_path / "data"), "--hidden", "8", "--n-way", "3",
                 "--k-query", "2", "--task-batch", "2", "--inner-steps", "1", "--steps", "1", "--val-episodes", "2",
                 "--test-episodes", "2", "--quiet", "--out", str(run)]) == 0
    assert load_checkpoint(run / "last.pt")["transform"]["convert_channels"] is True
    capsys.readouterr()
    support, query = tmp_path / "data" / "val", tmp_path / "data" / "val" / "val0"
    assert main(["predict", str(run), "--support", str(support), "--query", str(query)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 4
