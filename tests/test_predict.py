"""Prediction on a user's files: the preprocessing travels in the checkpoint, so ``predict`` on
Omniglot's own PNGs gives exactly the labels evaluation gives on the same episodes."""

import csv
import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_ARGS, glyph_files, shared_data
from fastadapt import Predictor, PredictorEnsemble, experiment
from fastadapt.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fastadapt.algorithms import forward
from fastadapt.cli import main
from fastadapt.data import EpisodeSampler, Glyphs, ImageTransform, TaskBatch
from fastadapt.data import source as data_source
from fastadapt.evaluate import evaluate

UNSEEN = "Japanese_(katakana),Sanskrit,Tagalog"


def omniglot_run(tmp_path, algo, test_steps):
    """A brief 5-way 1-shot run on images_background_small1, tested on unseen small2 alphabets."""
    root = shared_data("omniglot/images_background_small1.zip").parent
    shared_data("omniglot/images_background_small2.zip")
    run = tmp_path / algo
    args = ["train", "--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
            "--val-split", "background_small2", "--val-alphabets", UNSEEN, "--algo", algo, "--hidden", "16",
            "--n-way", "5", "--k-shot", "1", "--k-query", "5", "--task-batch", "4", "--inner-steps", "1",
            "--inner-steps-test", str(test_steps), "--steps", "30", "--eval-every", "10", "--val-episodes", "4",
            "--test-episodes", "3", "--quiet", "--out", str(run)]
    assert main(args) == 0
    return run, root


def extract_episode_files(root, config, dest):
    """The files of the run's fixed test episodes, copied byte for byte out of the zip as a user
    would unzip them: dest/task<t>/support/<label>-<character>/<file>.png and dest/task<t>/query/.
    Returns the loader's episodes and, per task, {query file name: its true label}."""
    source = data_source(config.data.dataset)
    test_set = source.build_sets(config)[2]
    d = config.data
    count = d.test_episodes
    sampler = EpisodeSampler(test_set, d.n_way, d.k_shot, d.k_query, count, seed=config.training.seed + 2)
    episodes = source.fixed_tasks(config, test_set, count, 2)
    assert len(episodes) == 1
    torch.testing.assert_close(sampler.fixed(1)[0].query_x, episodes[0].query_x, rtol=0, atol=0)
    picks, labels = sampler.fixed_indices(0)
    archive = zipfile.ZipFile(root / "images_background_small2.zip")
    truth = []
    for task in range(count):
        answers = {}
        for slot in range(d.n_way):
            label = int(labels[task, slot])
            for position, index in enumerate(picks[task, slot]):
                member = test_set.sources[index].split(".zip:", 1)[1]
                character = member.split("/")[-2]
                if position < d.k_shot:
                    target = dest / f"task{task}" / "support" / f"{label}-{character}" / member.split("/")[-1]
                else:
                    target = dest / f"task{task}" / "query" / member.split("/")[-1]
                    answers[target.name] = label
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
        truth.append(answers)
    return episodes[0], truth


# MAML++ is tested with the one step it was trained for: this briefly trained, its per-step running
# statistics do not yet carry a further step (issue 14), and the check needs non-constant output.
@pytest.mark.parametrize("algo, bn_statistics, test_steps", [("maml", "batch", 3), ("mamlpp", "running", 1),
                                                             ("protonet", "batch", 0)])
def test_predict_on_omniglot_files_equals_evaluation_on_the_same_episodes(algo, bn_statistics, test_steps,
                                                                          tmp_path, capsys):
    run, root = omniglot_run(tmp_path, algo, test_steps)
    capsys.readouterr()
    state = load_checkpoint(find_checkpoint(run))
    assert find_checkpoint(run).name == "best.pt"
    assert state["transform"]["invert"] is True and state["transform"]["background"] == "dark"
    config = experiment.resolve(experiment.with_bn_statistics(experiment.stored_config(state["config"]), bn_statistics))
    learner = experiment.build_learner(config)
    learner.load_state_dict(state["model"])
    batch, truth = extract_episode_files(root, config, tmp_path / "files")

    steps = config.algorithm.inner_steps_test
    evaluated = learner.fine_tune(batch, inner_steps=steps).task_accuracy[:, -1]
    reported = evaluate(learner, [batch], steps)
    # evaluation's transductive protocol: the queries of a task normalised together
    predictor = Predictor.load(run, device="cpu", bn_statistics=bn_statistics, query_statistics="batch")
    accuracies = []
    for task, answers in enumerate(truth):
        folder = tmp_path / "files" / f"task{task}"
        prediction = predictor.adapt(folder / "support").predict(folder / "query")
        labels = {p.rsplit("/", 1)[1]: int(name.split("-")[0]) for p, name in zip(prediction.sources, prediction.names)}
        # the same task through the loader's tensors, one query at a time in the loader's order
        with torch.no_grad():
            fast = learner.adapt(batch.support_x[task], batch.support_y[task], inner_steps=steps)
            loader_labels = learner.predict(fast, batch.query_x[task]).argmax(-1)
        assert [labels[name] for name in answers] == loader_labels.tolist()  # answers: the loader's order
        correct = sum(labels[name] == label for name, label in answers.items())
        accuracies.append(correct / len(answers))
        assert abs(accuracies[-1] - float(evaluated[task])) < 1e-6

        args = ["predict", str(run), "--support", str(folder / "support"), "--query", str(folder / "query"),
                "--query-statistics", "batch"]
        if bn_statistics == "running":
            args += ["--bn-statistics", "running"]
        assert main(args) == 0
        rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        assert [row["label"] for row in rows] == prediction.names
    assert abs(float(reported.accuracy[-1]) - float(np.mean(accuracies))) < 1e-6

    # Read the PNGs without inverting them (what predict did before the transform was stored):
    # the polarity warning fires and the outputs are no longer evaluation's.
    folder = tmp_path / "files" / "task0"
    with pytest.warns(UserWarning, match="light background.*pass --invert"):
        wrong = Predictor.load(run, device="cpu", bn_statistics=bn_statistics, invert=False,
                               query_statistics="batch").adapt(folder / "support")
    right = predictor.adapt(folder / "support").predict(folder / "query")
    # a model whose output depends on the image (its argmax may still be one class this early:
    # MAML++ in running mode after 30 iterations, with one torch thread)
    assert right.probabilities.std(0).max() > 1e-3
    assert (wrong.predict(folder / "query").probabilities - right.probabilities).abs().max() > 1e-3


# ---------------------------------------------------------------- the rest, on tiny Glyphs runs


@pytest.fixture(scope="module")
def glyph_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("glyphs") / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run)]) == 0
    return run


def test_predictor_reads_files_as_the_sampler_reads_the_data_set(glyph_run, tmp_path):
    predictor = Predictor.load(glyph_run, device="cpu")
    assert predictor.transform == Glyphs.default_transform(28)
    support, query = glyph_files(tmp_path)
    glyphs = Glyphs(num_classes=3, examples_per_class=3, split="test")
    files = sorted(support.rglob("*.png"))
    # the files are the data set's images inverted; read back they are the data set's tensors
    torch.testing.assert_close(predictor.transform.load(files), glyphs.to_tensor(glyphs.images[[0, 3, 6]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prediction = predictor.adapt(support).predict(query)
    assert prediction.class_names == ["c0", "c1", "c2"] and len(prediction) == 6
    assert prediction.probabilities.shape == (6, 3)
    torch.testing.assert_close(prediction.probabilities.sum(1), torch.ones(6))
    # tensors of network input give the same answer
    x = predictor.transform.load(files)
    again = predictor.adapt(x, labels=torch.arange(3), class_names=["c0", "c1", "c2"])
    assert again.predict(predictor.transform.load(sorted(query.glob("*.png")))).names == prediction.names


def test_polarity_warning_and_invert_override(glyph_run, tmp_path, capsys):
    light_support, light_query = glyph_files(tmp_path / "light")
    dark_support, dark_query = glyph_files(tmp_path / "dark", inverted=False)
    assert main(["predict", str(glyph_run), "--support", str(light_support), "--query", str(light_query)]) == 0
    reference = capsys.readouterr()
    assert "warning" not in reference.err
    assert main(["predict", str(glyph_run), "--support", str(dark_support), "--query", str(dark_query)]) == 0
    err = capsys.readouterr().err
    assert "fastadapt predict: warning:" in err and "light background" in err and "--no-invert" in err
    assert main(["predict", str(glyph_run), "--support", str(dark_support), "--query", str(dark_query),
                 "--no-invert"]) == 0
    overridden = capsys.readouterr()
    assert "warning" not in overridden.err
    labels = [row["label"] for row in csv.DictReader(io.StringIO(overridden.out))]
    assert labels == [row["label"] for row in csv.DictReader(io.StringIO(reference.out))]


def test_more_shots_and_uneven_shots(glyph_run, tmp_path):
    predictor = Predictor.load(glyph_run, device="cpu")
    support, query = glyph_files(tmp_path, shots=(1, 3, 2))
    prediction = predictor.adapt(support).predict(query)
    assert len(prediction) == 6
    # the same support set as a mapping of PIL images, and as tensors, adapts identically
    mapping = {c.name: [Image.open(p) for p in sorted(c.glob("*.png"))] for c in sorted(support.iterdir())}
    assert predictor.adapt(mapping).predict(query).names == prediction.names
    files = sorted(support.rglob("*.png"))
    labels = torch.tensor([int(p.parent.name[1]) for p in files])
    x = predictor.transform.load(files)
    with torch.no_grad():
        fast = predictor.learner.adapt(x, labels, inner_steps=predictor.inner_steps)
        queries = predictor.transform.load(sorted(query.glob("*.png")))
        direct = predictor.learner.predict(fast, queries, reference=x).argmax(-1)
    assert prediction.labels.tolist() == direct.tolist()


def test_class_count_must_match_the_head_but_protonet_takes_any(tmp_path):
    run = tmp_path / "maml"
    assert main(["train", *TINY_ARGS, "--epoch", "1", "--out", str(run)]) == 0
    support, query = glyph_files(tmp_path / "two", shots=(1, 2))
    with pytest.raises(ValueError, match="2 classes, but the model is 3-way"):
        Predictor.load(run, device="cpu").adapt(support)
    proto = tmp_path / "protonet"
    assert main(["train", *TINY_ARGS, "--epoch", "1", "--algo", "protonet", "--out", str(proto)]) == 0
    prediction = Predictor.load(proto, device="cpu").adapt(support).predict(query)
    assert prediction.probabilities.shape == (4, 2) and set(prediction.names) <= {"c0", "c1"}
    with pytest.raises(RuntimeError, match="adapt"):
        Predictor.load(proto, device="cpu").predict(query)


def test_csv_and_json_output_with_top_k(glyph_run, tmp_path, capsys):
    support, query = glyph_files(tmp_path)
    base = ["predict", str(glyph_run), "--support", str(support), "--query", str(query), "--inner-steps-test", "1"]
    assert main(base) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "label", "probability"] and len(rows) == 7
    assert main(base + ["--top-k", "2"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "label", "probability", "label_2", "probability_2"]
    assert all(float(r[2]) >= float(r[4]) and r[1] != r[3] for r in rows[1:])
    assert main(base + ["--format", "json", "--top-k", "3", "--steps", "1"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 6 and [r["label"] for r in records] == [r[1] for r in rows[1:]]
    assert all(abs(sum(t["probability"] for t in r["top_k"]) - 1) < 1e-5 for r in records)
    assert main(base + ["--top-k", "0"]) == 2
    assert "--top-k must be a positive integer" in capsys.readouterr().err


def test_non_image_files_are_skipped_and_unreadable_images_are_errors(glyph_run, tmp_path, capsys):
    support, query = glyph_files(tmp_path)
    (support / "c1" / "notes.txt").write_text("drawn by hand")
    (query / "Thumbs.db").write_bytes(b"\0\1")
    (query / ".hidden.png").write_bytes(b"ignored")
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query)]) == 0
    captured = capsys.readouterr()
    assert "notes.txt: not an image file" in captured.err and "Thumbs.db: not an image file" in captured.err
    assert len(captured.out.strip().splitlines()) == 7
    (query / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("fastadapt predict: warning: skipping") for line in err[:-1])
    assert err[-1].startswith("fastadapt predict: error:") and "broken.png: cannot decode image" in err[-1]


def test_old_checkpoint_without_preprocessing_loads_with_the_data_set_default(glyph_run, tmp_path):
    state = load_checkpoint(find_checkpoint(glyph_run))
    del state["transform"], state["class_names"]
    old = save_checkpoint(state, tmp_path / "old.pt")
    support, query = glyph_files(tmp_path)
    with pytest.warns(UserWarning, match="stores no preprocessing.*invert=True"):
        predictor = Predictor.load(old, device="cpu")
    assert predictor.transform == Glyphs.default_transform(28)
    assert predictor.adapt(support).predict(query).names == \
        Predictor.load(glyph_run, device="cpu").adapt(support).predict(query).names


def test_checkpoints_store_transform_and_class_names_and_test_json_scores_best(glyph_run):
    best = load_checkpoint(glyph_run / "best.pt")
    assert ImageTransform.from_dict(best["transform"]) == Glyphs.default_transform(28)
    assert best["class_names"] == Glyphs(num_classes=12, examples_per_class=1).class_names
    report = json.loads((glyph_run / "test.json").read_text())
    assert report["checkpoint"] == "best.pt" and report["step"] == best["step"] == best["best_step"]
    config = experiment.resolve(best["config"])
    learner = experiment.build_learner(config)
    learner.load_state_dict(best["model"])
    result = evaluate(learner, experiment.build_data(config, splits=("test",))["test"],
                      config.algorithm.inner_steps_test)
    assert report["accuracy"] == pytest.approx(result.accuracy.tolist(), abs=1e-9)
    last = load_checkpoint(glyph_run / "last.pt")
    assert ("final" in report) == (last["step"] != best["step"])


def test_image_transform_round_trip_and_errors(tmp_path):
    transform = ImageTransform(28, 3, resample="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert ImageTransform.from_dict(json.loads(json.dumps(transform.to_dict()))) == transform
    x = transform.to_tensor(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(x, torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageTransform(28, 2)
    with pytest.raises(ValueError, match="mean needs 3 value"):
        ImageTransform(28, 3, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="unknown field"):
        ImageTransform.from_dict({"image_size": 28, "colour": True})
    dot = tmp_path / "dot.png"
    Image.new("L", (1, 1)).save(dot)
    with pytest.raises(ValueError, match="nowhere.png: cannot read"):
        transform.decode(tmp_path / "nowhere.png")
    assert ImageTransform(28, invert=True).decode(dot).tolist() == [[[255] * 28] * 28]


def test_a_framed_folder_run_reads_a_drawing_alike_wherever_and_however_large_it_is(tmp_path, capsys):
    glyphs = Glyphs(num_classes=3, examples_per_class=6, split="test")
    for index in range(len(glyphs)):
        drawing = Image.fromarray(255 - glyphs.images[index, 0].numpy()).resize((84, 84), Image.Resampling.LANCZOS)
        split, c = ("train" if index % 6 < 3 else "val"), index // 6
        (tmp_path / "data" / split / f"g{c}").mkdir(parents=True, exist_ok=True)
        drawing.save(tmp_path / "data" / split / f"g{c}" / f"{index}.png")
    run = tmp_path / "run"
    folder_args = ["train", "--dataset", "folder", "--root", str(tmp_path / "data"), "--channels", "1", "--hidden", "8",
                   "--n-way", "3", "--k-query", "1", "--task-batch", "2", "--inner-steps", "1", "--steps", "2",
                   "--val-episodes", "2", "--test-episodes", "2", "--quiet"]
    assert main([*folder_args, "--frame", "0.8", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["frame"] == 0.8
    predictor = Predictor.load(run, device="cpu")
    assert predictor.transform.frame == 0.8
    query = tmp_path / "data" / "val" / "g0" / "5.png"
    corner = Image.new("L", (300, 200), 255)
    corner.paste(Image.open(query).resize((40, 40), Image.Resampling.LANCZOS), (250, 150))
    corner.save(tmp_path / "corner.png")
    predictor.adapt(tmp_path / "data" / "train")
    as_drawn, in_a_corner = (predictor.predict(path).probabilities for path in (query, tmp_path / "corner.png"))
    capsys.readouterr()
    assert main(["predict", str(run), "--support", str(tmp_path / "data" / "train"), "--query", str(query)]) == 0
    assert "each drawing cropped to its ink, centred, 0.8 of the image" in capsys.readouterr().err
    torch.testing.assert_close(in_a_corner, as_drawn, atol=0.05, rtol=0)
    stored = [predictor.transform.decode(path)[0].astype(int) for path in (query, tmp_path / "corner.png")]
    assert np.abs(stored[0] - stored[1]).mean() < 8
    capsys.readouterr()
    assert main([*folder_args, "--frame", "1.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--frame" in err and "fraction from 0.1 to 1" in err and "1.5" in err
    assert main(["train", *TINY_ARGS, "--frame", "0.8", "--out", str(tmp_path / "glyphs")]) == 0
    assert "--frame means nothing for glyphs" in capsys.readouterr().err


# ---------------------------------------------------------------- which images are normalised together


def test_reference_rows_normalise_with_the_reference_statistics_only():
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(10, 3, 4, 4) * 3 + 1
    with forward.applied(norm, forward.ForwardPolicy(reference_rows=4)):
        out = norm(x)
    mean, var = x[:4].mean((0, 2, 3)), x[:4].var((0, 2, 3), unbiased=False)
    shape = (1, 3, 1, 1)
    expected = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + norm.eps) * norm.weight.view(shape) \
        + norm.bias.view(shape)
    torch.testing.assert_close(out, expected)
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))
    with pytest.raises(ValueError, match="reference_rows"):
        forward.ForwardPolicy(reference_rows=0)


@pytest.mark.parametrize("algo", ["maml", "protonet", "anil"])
def test_predict_with_a_reference_makes_each_output_depend_on_its_own_row(algo):
    torch.manual_seed(0)
    learner = experiment.build_learner(experiment.resolve(dict(dataset="glyphs", algo=algo, hidden=8, n_way=3)))
    support_x, support_y = torch.rand(2, 3, 1, 28, 28), torch.arange(3).repeat(2, 1)
    queries = torch.rand(2, 5, 1, 28, 28)
    with torch.no_grad():
        fast = learner.adapt(support_x, support_y, inner_steps=1)
        together = learner.predict(fast, queries, reference=support_x)
        for task in range(2):
            one = {name: w[task] for name, w in fast.items()}
            alone = torch.cat([learner.predict(one, queries[task, i:i + 1], reference=support_x[task])
                               for i in range(5)])
            torch.testing.assert_close(alone, together[task], rtol=1e-4, atol=1e-5)
        # under batch statistics the other queries change an output
        batch = learner.predict({n: w[0] for n, w in fast.items()}, queries[0])
        single = learner.predict({n: w[0] for n, w in fast.items()}, queries[0, :1])
    assert (batch[:1] - single).abs().max() > 1e-3


def test_a_query_is_classified_the_same_alone_as_in_a_folder(glyph_run, tmp_path, capsys):
    support, query = glyph_files(tmp_path, queries=3)
    files = sorted(query.glob("*.png"))
    predictor = Predictor.load(glyph_run, device="cpu").adapt(support)
    assert predictor.mode == "support"
    together = predictor.predict(query)
    assert together.mode == "support"
    alone = torch.cat([predictor.predict(path).probabilities for path in files])
    torch.testing.assert_close(alone, together.probabilities, rtol=1e-4, atol=1e-5)

    transductive = Predictor.load(glyph_run, device="cpu", query_statistics="batch").adapt(support)
    assert transductive.mode == "batch"
    with pytest.warns(UserWarning, match="one image in batch mode is normalised by its own statistics alone"):
        changed = torch.cat([transductive.predict(path).probabilities for path in files])
    assert (changed - transductive.predict(query).probabilities).abs().max() > 1e-3
    with pytest.raises(ValueError, match="query_statistics must be one of support, batch"):
        Predictor.load(glyph_run, device="cpu", query_statistics="query")

    capsys.readouterr()
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(files[0])]) == 0
    single = capsys.readouterr()
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query)]) == 0
    folder = capsys.readouterr()
    assert single.out.splitlines()[1] in folder.out.splitlines()
    assert f"{glyph_run / 'best.pt'} (step 4)" in single.err
    assert "each query with the support set's statistics" in single.err
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query),
                 "--query-statistics", "batch"]) == 0
    assert "together (transductive" in capsys.readouterr().err


def test_test_time_views_are_drawn_from_each_image_so_alone_equals_together(glyph_run, tmp_path, capsys):
    support, query = glyph_files(tmp_path, queries=3)
    files = sorted(query.glob("*.png"))
    plain = Predictor.load(glyph_run, device="cpu").adapt(support).predict(query)
    copies = Predictor.load(glyph_run, device="cpu")
    copies.views, copies.view_augment = 3, lambda images, generator: images.clone()
    torch.testing.assert_close(copies.adapt(support).predict(query).probabilities, plain.probabilities,
                               rtol=1e-4, atol=1e-6)
    predictor = Predictor.load(glyph_run, device="cpu", views=4).adapt(support)
    assert predictor.views == 4 and "RandomAffine" in repr(predictor.view_augment)
    together = predictor.predict(query)
    alone = torch.cat([predictor.predict(path).probabilities for path in files])
    torch.testing.assert_close(alone, together.probabilities, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predictor.predict(query).probabilities, together.probabilities, rtol=0, atol=0)
    assert (together.probabilities - plain.probabilities).abs().max() > 1e-4
    torch.testing.assert_close(together.probabilities.sum(1), torch.ones(len(files)))
    assert together.labels.tolist() == together.probabilities.argmax(1).tolist()
    with pytest.raises(ValueError, match="views must be a positive integer"):
        Predictor.load(glyph_run, device="cpu", views=0)
    capsys.readouterr()
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query), "--tta", "4"]) == 0
    assert "test-time augmentation: 4 views of each image (RandomAffine(" in capsys.readouterr().err
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query), "--tta", "0"]) == 2
    assert "--tta must be a positive integer" in capsys.readouterr().err


def test_an_ensemble_of_predictors_averages_their_probabilities_alone_as_together(glyph_run, tmp_path, capsys):
    support, query = glyph_files(tmp_path, queries=3)
    files = sorted(query.glob("*.png"))
    other = tmp_path / "other"
    assert main(["train", *TINY_ARGS, "--algo", "protonet", "--seed", "3", "--out", str(other)]) == 0
    capsys.readouterr()
    first = Predictor.load(glyph_run, device="cpu").adapt(support).predict(query)
    second = Predictor.load(other, device="cpu").adapt(support).predict(query)
    ensemble = PredictorEnsemble.load([glyph_run, other], device="cpu").adapt(support)
    together = ensemble.predict(query)
    torch.testing.assert_close(together.probabilities, (first.probabilities + second.probabilities) / 2)
    assert together.labels.tolist() == together.probabilities.argmax(1).tolist()
    assert together.sources == first.sources and together.class_names == first.class_names
    alone = torch.cat([ensemble.predict(path).probabilities for path in files])
    torch.testing.assert_close(alone, together.probabilities, rtol=1e-4, atol=1e-5)
    assert ensemble.mode == "support" and len(ensemble.predictors) == 2
    with pytest.raises(TypeError, match="a tensor is one member's network input"):
        ensemble.predict(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="none of the runs has heads"):
        PredictorEnsemble.load([glyph_run, other], head="logistic")
    with pytest.raises(ValueError, match="one or more Predictor"):
        PredictorEnsemble([])
    five = tmp_path / "five"
    assert main(["train", *TINY_ARGS, "--n-way", "5", "--out", str(five)]) == 0
    with pytest.raises(ValueError, match=f"{five / 'best.pt'}: the support set has 3 classes, but the model is 5-way"):
        PredictorEnsemble.load([other, five], device="cpu").adapt(support)
    capsys.readouterr()
    assert main(["predict", str(glyph_run), str(other), "--support", str(support), "--query", str(query),
                 "--top-k", "2"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith(f"fastadapt predict: an ensemble of {glyph_run / 'best.pt'} (step 4), ")
    assert f" and {other / 'best.pt'} (step " in out.err and ", 0 adaptation step(s) on 3 classes" in out.err
    rows = list(csv.reader(io.StringIO(out.out)))
    assert [r[1] for r in rows[1:]] == together.names
    assert [float(r[2]) for r in rows[1:]] == pytest.approx(together.probabilities.max(1).values.tolist(), abs=1e-5)


def test_predict_input_errors_name_the_argument(glyph_run, tmp_path, capsys):
    support, query = glyph_files(tmp_path)
    assert main(["predict", str(glyph_run), "--support", str(support), "--query", str(query), "--steps", "-1"]) == 2
    assert "--steps must be a non-negative integer, got -1" in capsys.readouterr().err
    predictor = Predictor.load(glyph_run, device="cpu")
    with pytest.raises(ValueError, match="support mapping has no classes"):
        predictor.adapt({})
    with pytest.raises(ValueError, match="support tensor holds no images"):
        predictor.adapt(torch.zeros(0, 1, 28, 28), labels=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        Predictor.load(glyph_run, device="cpu", inner_steps=True)


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_training_with_support_statistics_scores_every_query_on_its_own(algo):
    torch.manual_seed(0)
    config = experiment.resolve(dict(dataset="glyphs", algo=algo, hidden=8, n_way=3, inner_steps=1,
                                     query_statistics="support", dtype="float64"))
    learner = experiment.build_learner(config).double()
    assert learner.query_statistics == "support"
    tasks = TaskBatch(torch.rand(2, 3, 1, 28, 28, dtype=torch.float64), torch.arange(3).repeat(2, 1),
                      torch.rand(2, 4, 1, 28, 28, dtype=torch.float64), torch.tensor([[0, 1, 2, 0]] * 2))

    def one_query(i):
        return TaskBatch(tasks.support_x, tasks.support_y, tasks.query_x[:, i:i + 1], tasks.query_y[:, i:i + 1])

    def meta_gradient(batch):
        learner.zero_grad()
        learner.meta_backward(batch)
        return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])

    # the loss of a task is the mean of its queries' losses, each scored alone; so is its gradient
    together = learner.fine_tune(tasks, 2).task_loss
    alone = torch.stack([learner.fine_tune(one_query(i), 2).task_loss for i in range(4)]).mean(0)
    torch.testing.assert_close(together, alone)
    gradient = meta_gradient(tasks)
    torch.testing.assert_close(gradient, torch.stack([meta_gradient(one_query(i)) for i in range(4)]).mean(0))
    learner.query_statistics = "batch"
    assert (meta_gradient(tasks) - gradient).abs().max() > 1e-6
    with pytest.raises(ValueError, match="query_statistics must be one of batch, support"):
        learner.query_statistics = "query"
    with pytest.raises(ValueError, match="query_statistics"):
        experiment.resolve(dict(dataset="glyphs", query_statistics="each"))


def test_a_run_trained_with_support_statistics_keeps_them_in_eval_predict_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--query-statistics", "support", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["algorithm"]["query_statistics"] == "support"
    loaded = experiment.load_run(run / "last.pt")
    assert loaded.learner.query_statistics == "support"
    assert main(["train", "--resume", str(run), "--query-statistics", "batch"]) == 2
    assert "--query-statistics" in capsys.readouterr().err
    main(["train", "--dataset", "sinusoid", "--steps", "1", "--eval-every", "1", "--val-episodes", "1",
          "--test-episodes", "1", "--query-statistics", "support", "--quiet", "--out", str(tmp_path / "sine")])
    assert "--query-statistics means nothing for sinusoid (its network has no BatchNorm)" in capsys.readouterr().err


def test_a_tasknorm_run_trained_in_support_mode_predicts_alone_as_together(tmp_path, capsys):
    run = tmp_path / "tn"
    assert main(["train", *TINY_ARGS, "--algo", "protonet", "--norm", "tasknorm", "--query-statistics", "support",
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["norm"] == "tasknorm"
    support, query = glyph_files(tmp_path, queries=3)
    predictor = Predictor.load(run, device="cpu").adapt(support)
    together = predictor.predict(query)
    alone = torch.cat([predictor.predict(path).probabilities for path in sorted(query.glob("*.png"))])
    torch.testing.assert_close(alone, together.probabilities, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["train", *TINY_ARGS, "--backbone", "resnet12", "--norm", "tasknorm", "--out", str(tmp_path / "r")]) == 2
    assert "--norm tasknorm is built into conv4 only" in capsys.readouterr().err
