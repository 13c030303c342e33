"""Two gloo processes on this machine train exactly like one process on the whole meta-batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fastadapt import distributed, experiment
from fastadapt.evaluate import evaluate
from fastadapt.train import Trainer
from helpers import InterruptAfter, SignalAt

CONFIG = dict(dataset="glyphs", glyph_classes=12, hidden=8, n_way=3, k_shot=1, k_query=2, task_batch=16,
              inner_steps=1, inner_steps_test=2, steps=20, eval_every=10, log_every=5, val_episodes=14,
              eval_batch=2, meta_lr=3e-3, dtype="float64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_pair(fn, args_after_port, tmp_path):
    """Two spawned gloo processes; run once more, in a fresh folder and on a fresh port, if one
    was aborted by a C++ ``terminate`` (SIGABRT). Seen once in about a dozen full-suite runs of
    the equality test, in gloo, and not reproduced in six runs beside a busy process; any other
    failure, or an abort twice, fails the test."""
    for attempt in range(2):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        try:
            mp.spawn(fn, args=(2, free_port(), *args_after_port(folder)), nprocs=2)
            return folder
        except mp.ProcessExitedException as error:
            if attempt or error.signal_name != "SIGABRT":
                raise
            print(f"a spawned process aborted ({error}); running the pair once more")


def join(rank, world, port, timeout_s):
    """Join a gloo group as torchrun would have set it up for this spawned process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    return distributed.init("cpu", timeout_s=timeout_s)


def train(out_dir, ctx=None):
    c = experiment.resolve(CONFIG)
    torch.manual_seed(c.training.seed)
    learner = experiment.build_learner(c)
    sources = experiment.build_data(c, splits=("train", "val"))
    Trainer(learner, sources["train"], c, out_dir, sources["val"], ctx).fit(progress=False)
    return learner, evaluate(learner, sources["val"], 2)


def assert_same_parameters(state: dict, learner) -> None:
    for name, value in learner.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)


def worker(rank, world, port, out_dir, result):
    """Train the run uninterrupted (``out_dir``/two), then again interrupted after 13 meta-batches
    and resumed by freshly built processes' state (``out_dir``/resumed)."""
    torch.set_num_threads(1)
    ctx = join(rank, world, port, timeout_s=120)
    learner, scores = train(Path(out_dir) / "two", ctx)
    torch.save({"model": learner.state_dict(), "eval": scores.as_dict()}, f"{result}.{rank}")
    torch.save(interrupted_and_resumed(Path(out_dir) / "resumed", ctx), f"{result}.resumed.{rank}")
    distributed.shutdown()


def test_two_processes_equal_one_process_and_an_interrupted_pair_resumes_to_the_same(tmp_path):
    tmp_path = spawn_pair(worker, lambda folder: (str(folder), str(folder / "result")), tmp_path)
    single, single_scores = train(tmp_path / "one")
    for rank in (0, 1):
        result = torch.load(tmp_path / f"result.{rank}", weights_only=True)
        assert_same_parameters(result["model"], single)
        assert_same_parameters(torch.load(tmp_path / f"result.resumed.{rank}", weights_only=True), single)
        # evaluation split over the ranks counts every task exactly once, on every rank
        assert result["eval"]["tasks"] == single_scores.tasks == 14
        torch.testing.assert_close(torch.tensor(result["eval"]["accuracy"], dtype=torch.float64),
                                   single_scores.accuracy, rtol=1e-5, atol=1e-6)
    # rank 0 alone writes: one metrics line per logging or evaluation step, as with one process
    two = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    one = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in two] == [json.loads(r)["step"] for r in one]
    assert sorted(os.listdir(tmp_path / "two")) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_uneven_meta_batch_is_a_clear_error():
    ctx = distributed.Context(rank=1, world_size=3)
    try:
        distributed.task_slice(16, ctx)
    except ValueError as error:
        assert "does not split evenly over 3 processes" in str(error)
    else:
        raise AssertionError("expected a ValueError")
    assert distributed.task_slice(12, ctx) == slice(4, 8)
    assert distributed.shard(list(range(7)), ctx) == [1, 4]


def worker_errors(stderr: str) -> str:
    """What the ranks themselves printed, without torchrun's own traceback and summary."""
    own = [line for line in stderr.splitlines()
           if not line.startswith(("  ", "Traceback", "torch.distributed.elastic", "=", "-"))]
    return "\n".join(own)[-4000:]


def test_torchrun_cli_prints_once_and_writes_once(tmp_path):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "fastadapt", "train", "--dataset", "glyphs", "--glyph-classes", "12",
               "--hidden", "8", "--n-way", "3", "--k-shot", "1", "--k-query", "2", "--task-batch", "4",
               "--inner-steps", "1", "--steps", "4", "--eval-every", "2", "--val-episodes", "4",
               "--test-episodes", "6", "--quiet", "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert result.returncode == 0, worker_errors(result.stderr)
    assert result.stdout.count("run folder") == 1 and "2 processes" in result.stdout
    assert result.stdout.count("6 test tasks") == 1
    assert json.loads((tmp_path / "run" / "test.json").read_text())["tasks"] == 6


def interrupted_and_resumed(out_dir, ctx) -> dict:
    c = experiment.resolve(CONFIG)
    torch.manual_seed(c.training.seed)
    learner = experiment.build_learner(c)
    sources = experiment.build_data(c, splits=("train", "val"))
    trainer = Trainer(learner, InterruptAfter(sources["train"], 13), c, out_dir, sources["val"], ctx)
    try:
        trainer.fit(progress=False)
    except KeyboardInterrupt:
        pass
    torch.distributed.barrier()
    torch.manual_seed(123)  # a resumed process starts from other random state
    learner = experiment.build_learner(c)
    trainer = Trainer(learner, experiment.build_data(c, splits=("train",))["train"], c, out_dir,
                      sources["val"], ctx)
    trainer.resume(Path(out_dir) / "last.pt")
    trainer.fit(progress=False)
    return learner.state_dict()


def silent_worker(rank, world, port, result):
    """Rank 1 joins but never takes part in a collective: rank 0 must fail, not hang."""
    import time
    ctx = join(rank, world, port, timeout_s=3)
    if rank == 1:
        deadline = time.monotonic() + 12
        while not Path(result).exists() and time.monotonic() < deadline:  # silent until rank 0 has given up
            time.sleep(0.1)
        os._exit(0)  # the group is broken: skip its destructor, which may abort the process
    start = time.perf_counter()
    try:
        distributed.average(torch.ones(3), ctx)
        outcome = "no error"
    except Exception as error:  # gloo raises RuntimeError subclasses on timeout
        outcome = f"error after {time.perf_counter() - start:.0f}s: {type(error).__name__}"
    Path(result).write_text(outcome)
    os._exit(0)


def test_a_silent_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    mp.spawn(silent_worker, args=(2, free_port(), str(tmp_path / "outcome")), nprocs=2)
    outcome = (tmp_path / "outcome").read_text()
    assert outcome.startswith("error after"), outcome
    assert int(outcome.split()[2].rstrip("s:")) < 12


def signal_worker(rank, world, port, out_dir, result):
    """Rank 1 alone gets SIGTERM at its fourth meta-batch: both ranks must stop cleanly, and rank 0 saves."""
    from fastadapt.train import Stopped, stop_on_signals
    torch.set_num_threads(1)
    ctx = join(rank, world, port, timeout_s=120)
    c = experiment.resolve(CONFIG)
    torch.manual_seed(c.training.seed)
    learner = experiment.build_learner(c)
    sources = experiment.build_data(c, splits=("train", "val"))
    import signal
    tasks = SignalAt(sources["train"], 3, signal.SIGTERM) if rank == 1 else sources["train"]
    trainer = Trainer(learner, tasks, c, out_dir, sources["val"], ctx)
    outcome = "finished"
    with stop_on_signals(trainer):
        try:
            trainer.fit(progress=False)
        except Stopped as stop:
            outcome = f"stopped {stop.exit_code} at {trainer.step}: {stop.reason}"
    Path(f"{result}.{rank}").write_text(outcome)
    distributed.shutdown()


def test_a_signal_to_one_rank_stops_every_rank_cleanly_and_saves(tmp_path):
    import signal
    port, result = free_port(), str(tmp_path / "outcome")
    mp.spawn(signal_worker, args=(2, port, str(tmp_path / "run"), result), nprocs=2, join=True)
    outcomes = [Path(f"{result}.{rank}").read_text() for rank in range(2)]
    code = 128 + signal.SIGTERM
    assert outcomes[1].startswith(f"stopped {code} at 4: SIGTERM"), outcomes
    assert outcomes[0].startswith(f"stopped {code} at 4: a stop request to another process"), outcomes
    from fastadapt.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


RL_CONFIG = dict(env="navigation-2d", task_batch=4, trajectories=3, horizon=12, hidden=8, inner_steps=1,
                 inner_steps_test=2, steps=4, eval_every=2, log_every=1, val_tasks=6, eval_batch=2, cg_iters=4,
                 dtype="float64")


def rl_train(out_dir, ctx=None):
    from fastadapt.rl import experiment as rl_experiment
    c = rl_experiment.check(experiment.resolve(RL_CONFIG))
    torch.manual_seed(c.training.seed)
    learner = rl_experiment.build_learner(c)
    sources = rl_experiment.build_tasks(c, splits=("train", "val"))
    Trainer(learner, sources["train"], c, out_dir, sources["val"], ctx).fit(progress=False)
    return learner, evaluate(learner, sources["val"], 2)


def rl_worker(rank, world, port, out_dir, result):
    torch.set_num_threads(1)
    ctx = join(rank, world, port, timeout_s=120)
    learner, scores = rl_train(Path(out_dir) / "two", ctx)
    torch.save({"model": learner.state_dict(), "eval": scores.as_dict()}, f"{result}.{rank}")
    distributed.shutdown()


def test_a_meta_rl_run_on_two_processes_equals_one_process(tmp_path):
    tmp_path = spawn_pair(rl_worker, lambda folder: (str(folder), str(folder / "result")), tmp_path)
    single, single_scores = rl_train(tmp_path / "one")
    for rank in (0, 1):
        result = torch.load(tmp_path / f"result.{rank}", weights_only=True)
        assert_same_parameters(result["model"], single)
        assert result["eval"]["tasks"] == single_scores.tasks == 6
        torch.testing.assert_close(torch.tensor(result["eval"]["returns"], dtype=torch.float64),
                                   torch.tensor(single_scores.as_dict()["returns"], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    one = [json.loads(r) for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        if "kl" in a:
            assert a["accepted"] == b["accepted"] and abs(a["kl"] - b["kl"]) < 1e-9
            torch.testing.assert_close(torch.tensor(b["returns"]), torch.tensor(a["returns"]))
    assert any(r.get("accepted") for r in one)  # the line search took steps, so equality means something
