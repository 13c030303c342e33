"""The default thread count: chosen by timing iterations, re-chosen when the load changes."""

import pytest
import torch

from fastadapt import Trainer, experiment
from fastadapt.threads import ThreadTuner, candidates


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def drive(tuner, seconds_at, steps):
    """Run ``steps`` iterations whose time is ``seconds_at(threads, step)``; the thread counts used."""
    used = []
    for step in range(steps):
        used.append(torch.get_num_threads())
        tuner.step(seconds_at(used[-1], step))
    return used


def test_candidates_halve_down_to_one():
    assert candidates(16) == [16, 8, 4, 2, 1] and candidates(6) == [6, 3, 1] and candidates(1) == [1]


def test_the_fastest_count_is_kept_and_a_slowdown_starts_new_trials(restore_threads):
    tuner = ThreadTuner(most=4, trial_steps=3, hold_steps=1000)
    quiet = {4: 1.0, 2: 1.4, 1: 2.0}
    busy = {4: 6.0, 2: 3.0, 1: 2.5}  # other processes took the cores
    used = drive(tuner, lambda n, step: quiet[n] + (5.0 if step % 3 == 0 else 0.0), 9)  # a switch's first is slow
    assert used == [4] * 3 + [2] * 3 + [1] * 3
    assert tuner.chosen == 4 and tuner.score == 1.0 and torch.get_num_threads() == 4
    assert drive(tuner, lambda n, step: quiet[n], 20) == [4] * 20
    # three iterations over 1.5x the chosen score: all counts are tried again, the one in use first
    used = drive(tuner, lambda n, step: busy[n], 3 + 9 + 5)
    assert used == [4] * 3 + [4] * 3 + [2] * 3 + [1] * 3 + [1] * 5
    assert tuner.chosen == 1 and [count for count, _ in tuner.history[-3:]] == [4, 2, 1]


def test_trials_repeat_after_hold_steps_so_a_quieter_machine_is_noticed(restore_threads):
    tuner = ThreadTuner(most=2, trial_steps=2, hold_steps=5)
    busy, quiet = {2: 3.0, 1: 2.0}, {2: 1.0, 1: 2.0}
    drive(tuner, lambda n, step: busy[n], 4)
    assert tuner.chosen == 1
    used = drive(tuner, lambda n, step: quiet[n], 5 + 4 + 3)
    assert used[5:9] == [1, 1, 2, 2] and tuner.chosen == 2 and used[9:] == [2, 2, 2]
    with pytest.raises(ValueError, match="trial_steps"):
        ThreadTuner(trial_steps=1)


def test_the_trainer_tunes_threads_unless_they_are_given(tmp_path, restore_threads):
    config = dict(dataset="glyphs", glyph_classes=12, hidden=8, n_way=3, k_shot=1, k_query=2, task_batch=2,
                  inner_steps=1, meta_steps=3, eval_every=3, log_every=1, val_episodes=2, test_episodes=2)
    resolved = experiment.resolve(config)
    learner = experiment.build_learner(resolved)
    tasks = experiment.build_data(resolved, splits=("train",))
    trainer = Trainer(learner, tasks["train"], resolved, tmp_path / "tuned").fit(progress=False)
    assert isinstance(trainer.thread_tuner, ThreadTuner)
    logged = [line for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines() if '"threads"' in line]
    assert len(logged) == 3
    fixed = Trainer(experiment.build_learner(resolved), tasks["train"], experiment.resolve({**config, "threads": 1}),
                    tmp_path / "fixed").fit(progress=False)
    assert fixed.thread_tuner is None and torch.get_num_threads() == 1
