"""Lake et al.'s one-shot protocol: episodes within one alphabet, support and queries by different
drawers; augmentation of training episodes; ``eval --protocol lake``. On the real Omniglot zips."""

import zipfile

import numpy as np
import pytest
import torch

from helpers import shared_data
from fastadapt.checkpoint import load_checkpoint
from fastadapt import experiment
from fastadapt.cli import main
from fastadapt.data import EpisodeSampler, Glyphs, Omniglot, RandomAffine, StrokeStyle, alphabets_of
from fastadapt.data.augment import Compose, training_augmentation
from fastadapt.data.omniglot import OmniglotSource


@pytest.fixture(scope="module")
def small2():
    return Omniglot(shared_data("omniglot/images_background_small2.zip").parent, "background_small2")


def test_within_alphabet_episodes_with_disjoint_drawers(small2):
    sampler = EpisodeSampler(small2, 20, 1, 1, 8, seed=3, group_by="alphabet", drawers="disjoint")
    seen = set()
    for episode in range(3):
        picks, labels = sampler.fixed_indices(episode)
        for task in range(8):
            alphabets = {small2.alphabets[int(small2.targets[i])] for i in picks[task].ravel()}
            assert len(alphabets) == 1
            seen |= alphabets
            support = set(small2.drawers[picks[task, :, 0]].tolist())
            query = set(small2.drawers[picks[task, :, 1]].tolist())
            assert len(support) == 1 and len(query) == 1 and support != query  # one drawer each, never the same
            assert sorted(labels[task]) == list(range(20))
    assert "Tagalog" not in seen  # 17 characters: too few for 20-way
    again = EpisodeSampler(small2, 20, 1, 1, 8, seed=3, group_by="alphabet", drawers="disjoint")
    torch.testing.assert_close(again.fixed(1)[0].query_x, sampler.fixed(1)[0].query_x, rtol=0, atol=0)
    other = EpisodeSampler(small2, 20, 1, 1, 8, seed=4, group_by="alphabet", drawers="disjoint")
    assert not torch.equal(other.fixed(1)[0].query_x, sampler.fixed(1)[0].query_x)
    # more shots: k_shot support drawers and k_query other ones, the same for every class
    picks, _ = EpisodeSampler(small2, 5, 2, 3, 2, group_by="alphabet", drawers="disjoint").fixed_indices(0)
    drawers = small2.drawers[torch.from_numpy(picks)]
    assert torch.equal(drawers, drawers[:, :1].expand_as(drawers))
    assert all(len(set(row.tolist())) == 5 for row in drawers[:, 0])


def test_the_minimal_sets_share_greek_and_latin_so_evaluation_leaves_out_what_training_saw(small2):
    root = shared_data("omniglot/images_background_small1.zip").parent
    small1_zip = zipfile.ZipFile(root / "images_background_small1.zip")
    small2_zip = zipfile.ZipFile(root / "images_background_small2.zip")

    def contents(archive, alphabet):  # file name within the alphabet -> CRC-32 of its bytes
        return {name.split("/", 2)[2]: archive.getinfo(name).CRC for name in archive.namelist()
                if name.split("/")[1] == alphabet and name.endswith(".png")}

    for alphabet in ("Greek", "Latin"):
        assert contents(small1_zip, alphabet) and contents(small1_zip, alphabet) == contents(small2_zip, alphabet)
    assert alphabets_of(root, "background_small1") == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]

    config = experiment.resolve({**experiment.PRESETS["omniglot-minimal-20w1s"], "root": str(root)})
    tasks, tested, left_out = OmniglotSource.lake_tasks(config, count=40)
    assert tested == ["Japanese_(katakana)", "Sanskrit"] and left_out == ["Greek", "Latin"]
    memorised = {image.numpy().tobytes() for image, target in zip(small2.images, small2.targets)
                 if small2.alphabets[int(target)] in ("Greek", "Latin")}
    shown = [image.numpy().tobytes() for batch in tasks for image in
             torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])]
    assert len(shown) == 40 * 40 and not memorised & set(shown)
    _, val, test = OmniglotSource.build_sets(config)
    for part in (val, test):
        assert sorted(set(part.alphabets)) == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
        assert part.left_out == ["Greek", "Latin"]
    other_seed = experiment.resolve({**experiment.PRESETS["omniglot-minimal-20w1s"], "root": str(root), "seed": 7})
    again = OmniglotSource.lake_tasks(other_seed, count=40)[0]  # the protocol's tasks, not the run's seed's
    assert all(torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y) for a, b in zip(tasks, again))
    with pytest.warns(UserWarning, match="include Greek, which the run trained on"):
        assert OmniglotSource.lake_tasks(config, alphabets="Greek,Sanskrit", count=2)[2] == []
    with pytest.raises(ValueError, match="every alphabet it has .* is excluded"):
        Omniglot(root, "background_small1", exclude_alphabets=alphabets_of(root, "background_small1"))


def test_grouping_and_drawer_errors(small2):
    with pytest.raises(ValueError, match="no alphabet has n_way=50 classes.*'Japanese_\\(katakana\\)', has 47"):
        EpisodeSampler(small2, 50, 1, 1, 2, group_by="alphabet")
    glyphs = Glyphs(num_classes=6, examples_per_class=4)
    with pytest.raises(ValueError, match="needs a data set with alphabets"):
        EpisodeSampler(glyphs, 3, 1, 1, 2, group_by="alphabet")
    with pytest.raises(ValueError, match="needs the drawer of every image"):
        EpisodeSampler(glyphs, 3, 1, 1, 2, drawers="disjoint")
    with pytest.raises(ValueError, match="group_by must be None or 'alphabet'"):
        EpisodeSampler(small2, 5, 1, 1, 2, group_by="font")
    with pytest.raises(ValueError, match="k_shot \\+ k_query = 21 is larger than class"):
        EpisodeSampler(small2, 5, 1, 20, 2, drawers="disjoint")


def test_random_affine_is_small_seeded_and_leaves_evaluation_alone():
    glyphs = Glyphs(num_classes=4, examples_per_class=3)
    x = glyphs.to_tensor(glyphs.images)
    identity = RandomAffine(shift=0, scale=(1, 1), rotation=0)(x, np.random.default_rng(0))
    torch.testing.assert_close(identity, x, rtol=0, atol=1e-5)
    affine = RandomAffine()
    a, b = affine(x, np.random.default_rng(1)), affine(x, np.random.default_rng(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    # ink is moved, not created: the total brightness stays within the zoom's square
    ratio = a.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ((ratio > 0.7) & (ratio < 1.3)).all()
    with pytest.raises(ValueError, match="RandomAffine"):
        RandomAffine(shift=1.5)
    plain = EpisodeSampler(glyphs, 3, 1, 2, 2, seed=0)
    augmented = EpisodeSampler(glyphs, 3, 1, 2, 2, seed=0, augment=affine)
    first = next(iter(augmented)).support_x
    second = next(iter(EpisodeSampler(glyphs, 3, 1, 2, 2, augment=affine))).support_x
    assert torch.equal(first, second) and not torch.equal(first, next(iter(plain)).support_x)


def test_stroke_style_thickens_or_thins_strokes_warps_smoothly_and_is_seeded(small2):
    x = small2.to_tensor(small2.images[0:200:10])
    assert x.shape[1:] == (1, 28, 28)
    identity = StrokeStyle(warp=0, width=0)(x, np.random.default_rng(0))
    torch.testing.assert_close(identity, x, rtol=0, atol=1e-5)
    style = StrokeStyle()
    a, b = style(x, np.random.default_rng(4)), style(x, np.random.default_rng(4))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert not torch.allclose(a, x) and a.min() >= 0 and a.max() <= x.max() + 1e-5
    # the width blend alone: a positive draw never darkens a pixel, a negative one never brightens
    drawn = np.random.default_rng(7)
    drawn.normal(0.0, 0.0, (len(x), 2, 4, 4))  # the warp's draws come first
    blends = drawn.uniform(-0.6, 0.6, len(x))
    width_only = StrokeStyle(warp=0)(x, np.random.default_rng(7))
    change = (width_only - x).flatten(1)
    assert (change[torch.as_tensor(blends > 0)] >= -1e-5).all()
    assert (change[torch.as_tensor(blends < 0)] <= 1e-5).all()
    assert (change.abs().sum(1) > 0).all()
    # the warp alone moves ink without creating much of it, and moves it by about a pixel
    warped = StrokeStyle(width=0)(x, np.random.default_rng(8))
    ratio = warped.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
    for bad in (dict(warp=0.6), dict(grid=1), dict(width=2.0)):
        with pytest.raises(ValueError, match="StrokeStyle"):
            StrokeStyle(**bad)
    assert training_augmentation(False, False) is None
    assert isinstance(training_augmentation(True, False), RandomAffine)
    assert isinstance(training_augmentation(False, True), StrokeStyle)
    both = training_augmentation(True, True)
    assert isinstance(both, Compose)
    rng = np.random.default_rng(9)
    expected = StrokeStyle()(RandomAffine()(x, rng), rng)
    torch.testing.assert_close(both(x, np.random.default_rng(9)), expected, rtol=0, atol=0)


def test_eval_protocol_lake_and_training_options_on_the_minimal_sets(tmp_path, capsys):
    root = shared_data("omniglot/images_background_small1.zip").parent
    shared_data("omniglot/images_background_small2.zip")
    common = ["train", "--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
              "--val-split", "background_small2", "--hidden", "8", "--k-query", "1", "--task-batch", "2",
              "--inner-steps", "1", "--steps", "2", "--val-episodes", "2", "--test-episodes", "2", "--quiet",
              "--augment", "--group-by", "alphabet"]
    assert main([*common, "--n-way", "20", "--out", str(tmp_path / "twenty")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "twenty"), "--protocol", "lake", "--episodes", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Lake et al.'s protocol" in out and "6 test tasks" in out
    assert "alphabets: Japanese_(katakana), Sanskrit (left out, seen in training: Greek, Latin)" in out
    assert main(["eval", str(tmp_path / "twenty"), "--protocol", "lake", "--episodes", "2", "--quiet",
                 "--alphabets", "Tagalog"]) == 2
    assert "n_way=20 is larger than the 17 classes" in capsys.readouterr().err
    assert main([*common, "--n-way", "5", "--out", str(tmp_path / "five")]) == 0
    assert main(["eval", str(tmp_path / "five"), "--protocol", "lake", "--quiet"]) == 2
    assert "is a 5-way model" in capsys.readouterr().err
    assert main([*common, "--n-way", "5", "--algo", "protonet", "--out", str(tmp_path / "proto")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "proto"), "--protocol", "lake", "--episodes", "2", "--quiet"]) == 0
    assert "2 test tasks" in capsys.readouterr().out


def test_minimal_preset_encodes_the_recipe_and_trains(tmp_path, capsys):
    from fastadapt.cli import train_config

    root = shared_data("omniglot/images_background_small1.zip").parent
    shared_data("omniglot/images_background_small2.zip")
    c = train_config(["--preset", "omniglot-minimal-20w1s", "--root", str(root)])
    assert (c.algorithm.name, c.data.n_way, c.data.k_shot, c.data.augment, c.data.group_by, c.data.options["rotations"],
            c.training.cosine, c.data.frame) == ("protonet", 20, 1, True, None, True, True, 0.8)
    assert (c.data.train_split, c.data.val_split) == ("background_small1", "background_small2")
    assert c.training.eval_every == c.training.meta_steps  # validated once, at the end: no selection on test
    assert train_config(["--preset", "omniglot-minimal-20w1s", "--root", str(root), "--frame", "off"]).data.frame is None
    run = tmp_path / "preset"
    assert main(["train", "--preset", "omniglot-minimal-20w1s", "--root", str(root), "--steps", "2", "--hidden", "8",
                 "--val-episodes", "2", "--test-episodes", "2", "--quiet", "--out", str(run)]) == 0
    assert load_checkpoint(run / "last.pt")["transform"]["frame"] == 0.8   # predict frames files as training did
    lake = OmniglotSource.lake_tasks(c, count=1)[0][0]   # Lake's tasks are framed too: each drawing 80% of 28 px
    images = torch.cat([lake.support_x, lake.query_x]).flatten(0, -3) > 0.25
    longer = [max(int(np.ptp(np.flatnonzero(ink.any(1)))), int(np.ptp(np.flatnonzero(ink.any(0))))) + 1
              for ink in images.numpy()]
    assert len(longer) == 40 and all(21 <= side <= 24 for side in longer), longer
    capsys.readouterr()
    assert main(["eval", str(run), "--protocol", "lake", "--episodes", "2", "--quiet"]) == 0
    assert "Lake et al.'s protocol" in capsys.readouterr().out


def test_drawers_disjoint_trains_on_episodes_shaped_like_lakes_runs(capsys):
    """``--drawers disjoint``: every training task's support images are by one drawer and its
    queries by k_query others, the same drawers for every class; elsewhere one clear line."""
    from fastadapt.cli import train_config

    root = shared_data("omniglot/images_background_small1.zip").parent
    shared_data("omniglot/images_background_small2.zip")
    c = train_config(["--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
                      "--val-split", "background_small2", "--n-way", "5", "--k-query", "3", "--task-batch", "3",
                      "--rotations", "--drawers", "disjoint"])
    assert c.data.drawers == "disjoint"
    train = experiment.build_data(c, splits=("train",))["train"]
    images = train.dataset
    for episode in range(4):
        picks, _ = train.fixed_indices(episode)
        drawers = images.drawers[torch.from_numpy(picks)]          # [task, class, 1 + k_query]
        assert torch.equal(drawers, drawers[:, :1].expand_as(drawers))  # the same drawers for every class
        for task in drawers[:, 0]:
            assert len(set(task.tolist())) == 4                  # the support's drawer is no query's
    plain = experiment.build_data(experiment.resolve(dict(c.flat(), drawers=None)), splits=("train",))["train"]
    picks, _ = plain.fixed_indices(0)
    assert any(len(set(images.drawers[torch.from_numpy(row)][:, 0].tolist())) > 1 for row in picks)
    with pytest.raises(Exception, match="drawers"):
        experiment.resolve(dict(c.flat(), drawers="same"))
    assert main(["train", "--drawers", "disjoint", "--steps", "1", "--glyph-classes", "20", "--quiet"]) == 2
    assert "drawers='disjoint' needs the drawer of every image" in capsys.readouterr().err
