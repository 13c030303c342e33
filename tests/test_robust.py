"""Runs that never lose work: signals, time limits, SIGKILL, divergence, one writer per folder,
resume overrides, and a one-line error (exit 2) for every bad input."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fastadapt import Trainer, experiment
from fastadapt.checkpoint import RunLock, load_checkpoint, save_checkpoint
from fastadapt.cli import main
from fastadapt.cli.train import _default_run_folder
from helpers import SignalAt

TINY_ARGS = ["--dataset", "glyphs", "--glyph-classes", "12", "--hidden", "8", "--n-way", "3", "--k-spt", "1",
             "--k-qry", "2", "--task-num", "2", "--update-step", "1", "--update-step-test", "2", "--epoch", "6",
             "--eval-every", "3", "--log-every", "1", "--val-episodes", "4", "--test-episodes", "4", "--quiet",
             "--cosine"]


def without_warnings(err: str) -> str:
    """stderr less warning lines (``train`` warns about a busy machine when the load says so)."""
    return "\n".join(line for line in err.strip().splitlines() if ": warning: " not in line)


def records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        r = json.loads(line)
        for timing in ("time", "tasks_per_s", "examples_per_s"):
            r.pop(timing, None)
        out.append(r)
    return out


def same_run(a, b):
    """Same final weights, same metrics, same test result."""
    wa, wb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert records(a) == records(b)
    ta, tb = (json.loads((r / "test.json").read_text()) for r in (a, b))
    assert (ta["checkpoint"], ta["step"], ta["accuracy"]) == (tb["checkpoint"], tb["step"], tb["accuracy"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("where, sig, at", [("train", signal.SIGTERM, 4), ("val", signal.SIGHUP, 0),
                                           ("test", signal.SIGINT, 0)])
def test_a_signal_anywhere_saves_and_resume_matches_an_uninterrupted_run(where, sig, at, straight, tmp_path,
                                                                         monkeypatch, capsys):
    real = experiment.build_data

    def build_data(config, splits=("train", "val", "test")):
        out = real(config, splits)
        if where in out:
            out[where] = SignalAt(out[where], at, sig)
        return out

    SignalAt.fired = False
    monkeypatch.setattr(experiment, "build_data", build_data)
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run)]) == 128 + sig
    err = capsys.readouterr().err
    assert f"stopped ({signal.Signals(sig).name})" in err and f"--resume {run}" in err
    state = load_checkpoint(run / "last.pt")
    assert not (run / "test.json").exists() and not (run / ".lock").exists()
    if where == "val":  # stopped part-way through the step-3 validation: validated again on resume
        assert state["step"] == 3 and state["validated_step"] == 0
    assert main(["train", "--resume", str(run)]) == 0
    same_run(straight, run)


def test_time_limit_stops_cleanly_and_resume_finishes(straight, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--time-limit", "1e-9", "--out", str(run)]) == 0
    assert "stopped (time limit" in capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["step"] == 0
    assert main(["train", "--resume", str(run)]) == 0  # the limit holds for every session of the run
    assert load_checkpoint(run / "last.pt")["step"] == 0
    assert main(["train", "--resume", str(run), "--time-limit", "3600"]) == 0
    same_run(straight, run)


def wait_for(condition, seconds=120):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def logged_steps(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_ignored_sigint_sigkill_and_a_stale_lock_as_a_scheduler_would_send_them(tmp_path):
    """Under ``nohup cmd &`` SIGINT arrives ignored: it still saves. SIGKILL loses at most the
    checkpoint interval (here every meta-iteration); the killed run's lock is taken over."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "fastadapt", "train", *TINY_ARGS, "--epoch", "100000", "--eval-every", "100000",
            "--checkpoint-every", "0", "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ignored = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: len(logged_steps(run)) >= 3)
    ignored.send_signal(signal.SIGINT)
    assert ignored.wait(60) == 130, ignored.stderr.read()
    assert "stopped (SIGINT)" in ignored.stderr.read()
    stopped_at = load_checkpoint(run / "last.pt")["step"]
    assert stopped_at == logged_steps(run)[-1]

    killed = subprocess.Popen([sys.executable, "-m", "fastadapt", "train", "--resume", str(run)], env=env,
                              stderr=subprocess.DEVNULL)
    wait_for(lambda: len(logged_steps(run)) >= stopped_at + 3)
    killed.kill()
    killed.wait(60)
    assert (run / ".lock").read_text().strip() == str(killed.pid)  # left behind by SIGKILL
    saved = load_checkpoint(run / "last.pt")["step"]
    assert saved >= logged_steps(run)[-1] - 1  # at most one meta-iteration lost

    assert main(["train", "--resume", str(run), "--steps", str(saved + 2)]) == 0
    steps = logged_steps(run)
    assert steps == list(range(1, saved + 3))  # every step once, in order


def test_divergence_stops_with_exit_1_and_keeps_finite_weights(tmp_path, capsys):
    assert main(["train", *TINY_ARGS, "--update-step", "3", "--update-lr", "1e6", "--out", str(tmp_path / "nan")]) == 1
    err = without_warnings(capsys.readouterr().err)
    assert "the meta-loss is nan at step 1" in err and "no checkpoint was written" in err
    run = tmp_path / "lr"
    assert main(["train", *TINY_ARGS, "--meta-lr", "1e6", "--eval-every", "1", "--out", str(run)]) == 1
    err = without_warnings(capsys.readouterr().err)
    assert err.count("\n") == 0 and err.startswith("fastadapt train: diverged:") and "lower --meta-lr" in err
    named = err.split("; ")[-1].split(" ")[0]
    if (run / "last.pt").exists():
        assert named == str(run / "last.pt")
        weights = load_checkpoint(run / "last.pt")["model"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    else:
        assert "no checkpoint was written" in err
    assert main(["train", *TINY_ARGS, "--inner-lr", "1e6", "--out", str(tmp_path / "inner")]) == 1
    err = without_warnings(capsys.readouterr().err)
    assert err.startswith("fastadapt train: diverged: the validation query loss after adapting is")
    assert "the inner loop diverges" in err and "lower --inner-lr (now 1e+06)" in err
    assert not (tmp_path / "inner").exists()  # nothing to resume: the failed run's folder is not left to block
    assert "no checkpoint was written before it" in err
    assert main(["train", *TINY_ARGS, "--inner-lr", "0.4", "--out", str(tmp_path / "inner")]) == 0
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["train", *TINY_ARGS, "--inner-lr", "1e6", "--out", str(kept)]) == 1
    assert [f.name for f in kept.iterdir()] == ["notes.txt"]


def test_one_writer_per_run_folder_and_distinct_default_folders(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{other.pid}\n")
        assert main(["train", *TINY_ARGS, "--out", str(run)]) == 2
        err = without_warnings(capsys.readouterr().err)
        assert f"in use by process {other.pid}" in err and err.count("\n") == 0
        with pytest.raises(RuntimeError, match="in use"):
            RunLock(run).__enter__()
    finally:
        other.kill()
        other.wait()
    assert main(["train", *TINY_ARGS, "--epoch", "1", "--out", str(run)]) == 0  # a dead owner's lock
    assert not (run / ".lock").exists()
    config = experiment.resolve({})
    assert str(os.getpid()) in _default_run_folder(config)


def test_resume_overrides(straight, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--epoch", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "6", "--threads", "1", "--device", "cpu"]) == 0
    assert "trained to step 6, 2 in this session" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["step"] == 6
    for bad, message in ((["--n-way", "5"], "--n-way cannot be given"), (["--steps", "2"], "already at step 6"),
                         (["--preset", "sinusoid"], "--preset cannot be given")):
        assert main(["train", "--resume", str(run), *bad]) == 2
        assert message in capsys.readouterr().err
    # a run saved on a GPU resumes and evaluates on a machine without one
    state = load_checkpoint(run / "last.pt")
    state["config"]["training"]["device"] = "cuda"
    save_checkpoint(state, run / "last.pt")
    if not torch.cuda.is_available():
        assert main(["train", "--resume", str(run), "--steps", "7"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--steps", "7", "--device", "cpu"]) == 0
    assert main(["eval", str(run / "last.pt"), "--episodes", "2"]) == 0


def test_progress_bars_for_validation_test_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    args = [a for a in TINY_ARGS if a != "--quiet"]
    assert main(["train", *args, "--epoch", "3", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "meta-train" in err and "validate @ 3" in err
    tested = json.loads((run / "test.json").read_text())
    if tested["checkpoint"] == "best.pt" and tested["step"] == 3 and "final" not in tested:
        assert "test (best.pt = last.pt)" in err and "test (last.pt)" not in err
    else:
        assert "test (last.pt)" in err and "test (best.pt)" in err
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    assert "evaluate" in capsys.readouterr().err
    assert main(["eval", str(run), "--episodes", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


BAD_OPTIONS = [
    (["--eval-every", "0"], "--eval-every must be a positive integer"),
    (["--log-every", "0"], "--log-every must be a positive integer"),
    (["--clip-grad", "-1"], "--clip-grad must be a positive finite number"),
    (["--inner-steps-test", "-1"], "--inner-steps-test must be a non-negative integer"),
    (["--hidden", "0"], "--hidden must be a positive integer"),
    (["--imgc", "2"], "glyphs images have 1 channel"),
    (["--meta-lr", "nan"], "--meta-lr must be a positive finite number"),
    (["--inner-lr", "inf"], "--inner-lr must be a positive finite number"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be a non-negative"),
    (["--time-limit", "0"], "--time-limit must be a positive finite number"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--device", "tpu"], "--device 'tpu' is not a device name"),
    (["--steps", "many"], "invalid int value: 'many'"),
]


@pytest.mark.parametrize("bad, message", BAD_OPTIONS, ids=[b[0] for b, _ in BAD_OPTIONS])
def test_every_bad_option_is_one_line_and_exit_2(bad, message, tmp_path, capsys):
    assert main(["train", *TINY_ARGS, *bad, "--out", str(tmp_path / "run")]) == 2
    err = without_warnings(capsys.readouterr().err)
    assert err.count("\n") == 0 and "error:" in err and message in err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_cpu_build_is_one_line(capsys):
    assert main(["train", *TINY_ARGS, "--device", "cuda"]) == 2
    err = without_warnings(capsys.readouterr().err)
    assert err.count("\n") == 0 and "--device cuda: CUDA is not available" in err and "use device 'cpu'" in err


def test_bad_checkpoints_and_images_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"model": {}, "config": {}}, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:40])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "noconfig.pt")
    cases = {"empty.pt": "the file is empty", "truncated.pt": "cannot be read as a PyTorch checkpoint",
             "noconfig.pt": "holds a dict with keys ['weights']"}
    for name, message in cases.items():
        assert main(["eval", str(tmp_path / name)]) == 2
        err = without_warnings(capsys.readouterr().err)
        assert err.count("\n") == 0 and str(tmp_path / name) in err and message in err
        assert "expected a fastadapt checkpoint" in err
        assert main(["train", "--resume", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--epoch", "1", "--out", str(run)]) == 0
    poisoned = load_checkpoint(run / "last.pt")
    next(iter(poisoned["model"].values())).fill_(float("nan"))
    save_checkpoint(poisoned, tmp_path / "nan.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nan.pt")]) == 2
    assert "are not finite; this checkpoint cannot be evaluated" in capsys.readouterr().err
    for c in range(3):
        (tmp_path / "support" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "support" / f"c{c}" / "0.png")
    huge = tmp_path / "support" / "c0" / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)
    capsys.readouterr()
    assert main(["predict", str(run), "--support", str(tmp_path / "support"), "--query", str(huge)]) == 2
    err = without_warnings(capsys.readouterr().err)
    assert err.count("\n") == 0 and "huge.png: cannot decode image" in err


def test_no_subcommand_prints_help_and_help_shows_defaults(capsys):
    assert main([]) == 0
    assert "{train,eval,predict,plot}" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 300.0)" in text and "(default: 0.001)" in text and "--time-limit" in text


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["eval", str(tmp_path / "missing"), "--debug"])


def test_sinusoid_run_is_labelled_as_regression(tmp_path, capsys):
    assert main(["train", "--preset", "sinusoid", "--steps", "2", "--eval-every", "2", "--val-episodes", "2",
                 "--test-episodes", "2", "--quiet", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "regression, K=10" in out and "-way" not in out


def test_a_run_folder_is_never_overwritten_by_accident(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run)]) == 0
    before = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "test.json", "config.json")}
    capsys.readouterr()
    assert main(["train", *TINY_ARGS, "--steps", "3", "--out", str(run)]) == 2
    err = without_warnings(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and f"--resume {run}" in err and "--overwrite" in err and "already holds a run" in err
    assert {name: (run / name).read_bytes() for name in before} == before
    # --overwrite replaces it: the metrics are the new run's alone
    assert main(["train", *TINY_ARGS, "--steps", "3", "--eval-every", "3", "--out", str(run), "--overwrite"]) == 0
    assert [r["step"] for r in records(run) if "val" not in r] == [1, 2, 3]
    assert load_checkpoint(run / "last.pt")["step"] == 3
    # the Python API refuses the same, and takes overwrite=True
    config = experiment.resolve(dict(dataset="glyphs", glyph_classes=12, hidden=8, n_way=3, k_query=2, task_batch=2,
                                     inner_steps=1, meta_steps=2, eval_every=2, val_episodes=2, test_episodes=2))
    learner = experiment.build_learner(config)
    sources = experiment.build_data(config, splits=("train", "val"))
    trainer = Trainer(learner, sources["train"], config, run, sources["val"])
    with pytest.raises(FileExistsError, match="already holds a run .*Trainer.resume.*overwrite=True"):
        trainer.fit(progress=False)
    assert load_checkpoint(run / "last.pt")["step"] == 3
    Trainer(learner, sources["train"], config, run, sources["val"], overwrite=True).fit(progress=False)
    assert load_checkpoint(run / "last.pt")["step"] == 2


def test_a_cut_off_metrics_line_is_dropped_with_a_warning_and_a_corrupt_one_named(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "3", "--eval-every", "3", "--out", str(run)]) == 0
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 4, "loss": 0.5, "query_lo')   # killed mid-write
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl: its last line (" in err and "cut off" in err
    assert [r["step"] for r in records(run) if "val" not in r] == [1, 2, 3, 4, 5, 6]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    assert main(["plot", str(run)]) == 2
    assert f"{metrics}, line 2: not a metrics record" in capsys.readouterr().err
    assert main(["eval", str(run), "--episodes", "0"]) == 2
    assert "--episodes must be a positive integer, got 0" in capsys.readouterr().err


def test_a_seed_out_of_range_is_named_by_its_flag(tmp_path, capsys):
    for seed, message in (("-1", "--seed must be a non-negative integer, got -1"),
                          (str(2 ** 64), "--seed must be below 2^63")):
        assert main(["train", *TINY_ARGS, "--seed", seed, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_zip_bomb_checkpoint_is_refused_before_it_is_inflated(tmp_path, capsys):
    import zipfile
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (200 << 20))   # 200 MiB of zeros, about 200 KiB deflated
    assert path.stat().st_size < 1 << 20
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refused: its records inflate to 200 MiB" in err and "bomb.pt" in err
    with pytest.raises(ValueError, match="inflate to 200 MiB"):
        load_checkpoint(path)


def test_options_that_mean_nothing_for_the_algorithm_or_data_are_warned_about(tmp_path, capsys):
    args = [*TINY_ARGS, "--steps", "1", "--algo", "protonet", "--inner-lr", "0.2", "--first-order"]
    assert main(["train", *args, "--out", str(tmp_path / "proto")]) == 0
    err = capsys.readouterr().err
    assert "--inner-lr means nothing for protonet (it takes no inner gradient steps); it is ignored" in err
    assert "--first-order means nothing for protonet" in err
    assert main(["train", "--preset", "sinusoid", "--n-way", "3", "--steps", "1", "--val-episodes", "2",
                 "--test-episodes", "2", "--quiet", "--out", str(tmp_path / "sin")]) == 0
    assert "--n-way means nothing for sinusoid" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, "--steps", "1", "--rotations", "--out", str(tmp_path / "glyphs")]) == 2
    assert "--rotations is not an option of data set 'glyphs'" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, "--steps", "1", "--out", str(tmp_path / "plain")]) == 0
    assert "means nothing" not in capsys.readouterr().err


# ---------------------------------------------------------------- full disks, read-only folders, damaged zips


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(run)]) == 0
    before = (run / "last.pt").read_bytes()
    import fastadapt.checkpoint as checkpoint

    def full(payload, out):  # what torch.save raises when the disk fills under it
        out.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 165440 vs 165336")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=4096))
    with pytest.raises(checkpoint.WriteFailed, match=r"could not write .*last.pt: the disk is full \(0.0 MiB free\); "
                                                      r"the previous last.pt is intact"):
        save_checkpoint({"x": 1}, run / "last.pt")
    assert (run / "last.pt").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("fastadapt train: error: could not write") and "disk is full" in err


@pytest.mark.parametrize("code, cause", [(30, "the file system is read-only"), (13, "no permission to write in"),
                                         (28, "the disk is full")])
def test_write_errors_name_the_file_and_the_cause(code, cause, tmp_path, monkeypatch, recwarn):
    from fastadapt.checkpoint import WriteFailed, write_text, writing
    with pytest.raises(WriteFailed, match=f"could not write {tmp_path / 'metrics.jsonl'}: {cause}"):
        with writing(tmp_path / "metrics.jsonl"):
            raise OSError(code, os.strerror(code))
    with pytest.raises(ValueError, match="not a write"):  # other errors pass through untouched
        with writing(tmp_path / "x"):
            raise ValueError("not a write")
    write_text(tmp_path / "config.json", "{}")
    assert (tmp_path / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]

    # a folder made read-only mid-run: the lock that cannot be removed is a warning, not the error
    lock = RunLock(tmp_path / "held").__enter__()
    monkeypatch.setattr(type(lock.path), "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    lock.__exit__(None, None, None)
    assert "could not remove" in str(recwarn.pop(UserWarning).message)


def test_a_damaged_omniglot_zip_and_a_failed_new_run_leave_one_line_and_no_folder(tmp_path, capsys):
    import zipfile
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "images_background_small1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for c in range(3):
            for d in range(1, 3):
                image = io_png(np.full((105, 105), 255 if (c + d) % 2 else 0, np.uint8))
                zf.writestr(f"images_background_small1/Alpha/character{c:02d}/{c:04d}_{d:02d}.png", image)
    whole = archive.read_bytes()
    args = ["train", "--dataset", "omniglot", "--root", str(root), "--train-split", "background_small1",
            "--val-split", "background_small1", "--n-way", "2", "--steps", "1", "--quiet"]
    archive.write_bytes(whole[: len(whole) // 2])  # a download cut off
    assert main(args + ["--out", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert f"{archive} is not a readable zip file" in err and "download it again" in err
    assert not (tmp_path / "cut").exists()

    damaged = bytearray(whole)
    start = whole.index(b"character01")  # inside the first member's local header and data
    damaged[start:start + 40] = bytes(b ^ 0x5A for b in damaged[start:start + 40])
    archive.write_bytes(bytes(damaged))
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert main(args + ["--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert f"{archive}: images_background_small1/Alpha/character01" in err and "the zip is damaged" in err
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # the user's folder and file stay


def io_png(array) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_class_folders_are_read_one_level_deep_and_a_link_to_the_root_is_not_walked(tmp_path):
    from fastadapt.data import ImageFolder
    root = tmp_path / "train"
    for folder in ("a", "b", "b/strokes", "c/alphabet"):
        (root / folder).mkdir(parents=True)
    png = io_png(np.full((8, 8), 200, np.uint8))
    for folder in ("a", "b", "b/strokes", "c/alphabet"):
        for i in range(2):
            (root / folder / f"{i}.png").write_bytes(png)
    with pytest.raises(ValueError, match=r"class folder .*/c holds no image files; its 1 sub-folder\(s\) "
                                         r"\(alphabet\) are not read \(the layout is root/<class>/<image>"):
        ImageFolder(root, image_size=8)
    (root / "c" / "alphabet" / "0.png").rename(root / "c" / "0.png")
    with pytest.warns(UserWarning, match=r"class folder .*/b: its 1 sub-folder\(s\) \(strokes\) are not read"):
        data = ImageFolder(root, image_size=8)
    assert data.class_names == ["a", "b", "c"] and len(data) == 5
    assert all(path.parent.name in ("a", "b", "c") for path in data.files)
    (root / "d").symlink_to(tmp_path)  # a loop: d/train/d/train/...
    with pytest.raises(ValueError, match=r"class folder .*/d holds no image files; its 1 sub-folder\(s\) \(train\)"):
        ImageFolder(root, image_size=8)


def test_plot_draws_no_empty_legend_when_nothing_was_logged(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "2", "--log-every", "50", "--eval-every", "50", "--out", str(run)]) == 0
    assert not [r for r in records(run) if "loss" in r]
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kw: saved.append(figure))
    assert main(["plot", str(run)]) == 0
    curves = saved[0].axes[0]
    assert all(len(line.get_xdata()) for line in curves.lines)   # no legend entry without a curve
    assert "train query loss" not in [line.get_label() for line in curves.lines]
    assert "no training loss logged" in curves.texts[0].get_text()


def test_a_query_folder_is_read_with_its_class_sub_folders_and_no_deeper(tmp_path):
    from fastadapt.predict import Predictor
    query = tmp_path / "query"
    for folder in ("", "cat", "cat/strokes"):
        (query / folder).mkdir(parents=True, exist_ok=True)
        (query / folder / "0.png").write_bytes(io_png(np.full((8, 8), 200, np.uint8)))
    with pytest.warns(UserWarning, match=r"query folder .*query: its 1 sub-folder\(s\) \(strokes\) are not read"):
        files = Predictor._query_files(query)
    assert [str(f.relative_to(query)) for f in files] == ["0.png", "cat/0.png"]
    empty = tmp_path / "empty"
    (empty / "a" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"query folder .*empty holds no image files"):
        Predictor._query_files(empty)
