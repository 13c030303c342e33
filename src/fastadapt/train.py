"""The training loop: meta-optimiser, schedule, evaluation, checkpoints and metrics.

Read top to bottom: ``Trainer.fit`` draws a meta-batch, has the learner take one meta-iteration
(``learner.train_step``: by default the meta-gradient, clipped, and an Adam step), logs every ``log_every`` steps, evaluates on fixed
validation tasks every ``eval_every`` steps, and writes ``last.pt`` (and ``best.pt``) at every
validation and every ``checkpoint_every`` seconds. Everything needed to continue exactly where it
stopped is in the checkpoint: model, optimiser and schedule state, step, configuration, torch RNG
state, the task stream's position and whether that step's validation ran.

A stop asked for by a signal (``stop_on_signals``) or the ``time_limit`` takes effect between two
meta-iterations (or between two batches of a validation), after which ``last.pt`` is saved and
``Stopped`` is raised; ``--resume`` then continues to the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import built_in_python, load_checkpoint, save_checkpoint, write_text, writing
from .config import RunConfig
from .evaluate import evaluate
from .threads import ThreadTuner
from .version import __version__


class TrainingDiverged(RuntimeError):
    """The meta-loss became non-finite or exploded (or the weights did); ``last.pt``, if any, holds
    the last weights that were all finite."""


class Stopped(Exception):
    """Training stopped early on request (a signal, or the time limit), after saving ``last.pt``.
    ``exit_code``: 128 + the signal's number, or 0 for the time limit."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


# What a run writes into its folder; a folder holding any of them holds a run.
RESULT_FILES = ("last.pt", "best.pt", "metrics.jsonl", "test.json")


def run_files(folder: Path, names=RESULT_FILES + ("config.json",)) -> list:
    """Which of a run's files ``folder`` holds."""
    return [name for name in names if (Path(folder) / name).is_file()]


def already_a_run(folder, held, resume: str, overwrite: str) -> str:
    return (f"{folder} already holds a run ({', '.join(held)}); continue it with {resume}, choose another "
            f"folder, or replace it with {overwrite}")


def read_metrics(path: Path) -> list:
    """The records of a ``metrics.jsonl``. A last line cut off mid-write (a killed run, a full disk)
    is dropped with a warning; any other line that is not a JSON record is an error naming the
    file and the line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):
                warnings.warn(f"{path}: its last line ({number}) is cut off or not a record; it is dropped",
                              stacklevel=2)
                break
            raise ValueError(f"{path}, line {number}: not a metrics record ({error})") from None
        records.append(record)
    return records


# A meta-loss this many times the first iteration's (or 1, if larger) counts as an explosion.
EXPLOSION_FACTOR = 1000.0


@contextlib.contextmanager
def stop_on_signals(trainer, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """While inside, SIGINT, SIGTERM and SIGHUP ask ``trainer`` to stop cleanly (a second one of
    the same kind stops at once). Installed even where the shell ignored SIGINT (``nohup cmd &``)."""
    previous = {}

    def handler(number, frame):
        if trainer.stop_request is not None and trainer.stop_request[1] == 128 + number:
            raise KeyboardInterrupt
        trainer.request_stop(signal.Signals(number).name, 128 + number)

    for number in signals:
        previous[number] = signal.signal(number, handler)
    try:
        yield trainer
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _class_name(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def run_config(config, learner) -> RunConfig:
    """A ``RunConfig`` from one, or from a flat or nested dict (``dict(meta_lr=1e-3, steps=50)``),
    with its training settings and the options of ``learner``'s algorithm checked."""
    config = RunConfig.from_dict(config.to_dict() if isinstance(config, RunConfig) else config)
    config.training.check()
    config.algorithm.check(type(learner).accepted_options())
    return config


class Trainer:
    """Meta-trains ``learner`` on the meta-batches of ``tasks`` as ``config`` (a ``RunConfig``, or a
    dict of its flat keys) says; the whole configuration is stored in every checkpoint."""

    def __init__(self, learner, tasks, config, out_dir=None, val_tasks=None, dist_context=None,
                 writer=None, transform=None, class_names=None, overwrite: bool = False):
        self.learner, self.tasks = learner, tasks
        self.config = run_config(config, learner)
        self._record_model()
        t = self.training = self.config.training
        # What turned files into the training tensors, and the training classes: stored in every
        # checkpoint so prediction reads a user's files the same way. By default the task
        # source's data set's (an EpisodeSampler's).
        dataset = getattr(tasks, "dataset", None)
        self.transform = transform if transform is not None else getattr(dataset, "transform", None)
        self.class_names = class_names if class_names is not None else getattr(dataset, "class_names", None)
        self.writer = writer  # e.g. torch.utils.tensorboard.SummaryWriter: anything with add_scalar
        # Under torchrun each rank trains on its share of every meta-batch (fastadapt.distributed).
        self.dist = dist_context or distributed.current()
        self.thread_tuner = None  # a ThreadTuner while fit runs on the CPU without --threads
        self.val_tasks = val_tasks
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # a new run never writes into a folder that holds another: resume() it, or ask to overwrite
        self.overwrite, self.resumed = bool(overwrite), False
        self.device = torch.device(t.device)
        self.dtype = next(learner.parameters()).dtype
        self.optimizer = learner.make_optimizer(t.meta_lr)
        # seconds of meta-iterations over the whole run (resumes included; validation excluded),
        # the same on every rank: what ``budget`` limits
        self.budget_used = 0.0
        self.scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._cosine_factor)
                          if t.cosine else None)
        self.step = 0
        # time in the meta-iterations this process ran (validation excluded), and how many it ran
        self.step_seconds, self.steps_run = 0.0, 0
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_model: Optional[dict] = None  # a copy of the weights that scored ``best``
        self.validated_step = 0  # the last step whose validation finished
        self.first_loss: Optional[float] = None  # the explosion guard's reference
        self.stop_request: Optional[tuple] = None  # (reason, exit code), set by request_stop
        self._tasks_state = tasks.state_dict()

    def _record_model(self) -> None:
        """Make the configuration describe the network the learner holds (and how it normalises
        its queries), so that a run made in Python (any conv4) is rebuilt by ``eval``, ``predict``
        and ``--resume`` as it was."""
        self.config.algorithm.query_statistics = getattr(self.learner, "query_statistics", "batch")
        spec = getattr(getattr(self.learner, "model", None), "spec", None)
        if not isinstance(spec, dict) or self.config.model.network is not None:
            return
        d, m = self.config.data, self.config.model
        d.channels, d.image_size = spec["in_channels"], spec["image_size"]
        m.backbone = spec.get("backbone", "conv4")
        if m.backbone == "resnet12":
            m.widths, m.drop_block = list(spec["widths"]), spec["drop_prob"]
        else:
            m.hidden, m.pool, m.norm = spec["hidden"], spec["pool"], spec.get("norm", "batch")
        m.outputs = None if spec["n_way"] == d.n_way else spec["n_way"]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.learner.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "step": self.step, "best": self.best, "config": self.config.to_dict(), "rng": torch.get_rng_state(),
            "tasks": self._tasks_state, "version": __version__, "best_step": self.best_step,
            "validated_step": self.validated_step, "first_loss": self.first_loss,
            "transform": self.transform.to_dict() if self.transform is not None else None,
            "class_names": self.class_names, "budget_used": self.budget_used,
            "model_class": _class_name(getattr(self.learner, "model", self.learner)),
        }

    def save(self, name: str = "last.pt") -> Optional[Path]:
        """Write a checkpoint; weights that are not all finite are never written (the previous
        file, whose weights were, is kept)."""
        if self.out_dir is None or not self.dist.is_main or not self.weights_finite():
            return None
        path = save_checkpoint(self.state_dict(), self.out_dir / name)
        if name == "last.pt":
            self._saved_at = time.monotonic()
        return path

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.learner.parameters())

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        """Stop at the next safe point (between meta-iterations or validation batches)."""
        self.stop_request = (reason, exit_code)

    def _stop_now(self) -> bool:
        """Whether to stop; under torch.distributed every rank must agree, so the ranks share it:
        a signal to any one process stops them all, each with that request's exit code."""
        if not self.dist.enabled:
            return self.stop_request is not None
        code = self.stop_request[1] if self.stop_request is not None else -1
        shared = distributed.maximum(torch.tensor([float(self.stop_request is not None), float(code)],
                                                  device=self.device), self.dist)
        if shared[0] > 0 and self.stop_request is None:
            self.stop_request = ("a stop request to another process of the run", int(shared[1]))
        return bool(shared[0] > 0)

    def resume(self, path) -> None:
        state = load_checkpoint(path)
        self.resumed = True
        try:
            self.learner.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(f"{path}: its weights do not fit this learner ({str(error).splitlines()[-1].strip()})"
                             f"{built_in_python(state)}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.best_step = int(state["step"]), state["best"], state.get("best_step")
        # older checkpoints were written only after validation: their step counts as validated
        self.validated_step = int(state.get("validated_step", self.step))
        self.first_loss = state.get("first_loss")
        self.budget_used = float(state.get("budget_used", 0.0))
        best = Path(path if Path(path).is_dir() else Path(path).parent) / "best.pt"
        if self.best is not None and best.is_file():
            self.best_model = load_checkpoint(best)["model"]
        torch.set_rng_state(state["rng"])
        self.tasks.load_state_dict(state["tasks"])
        self._tasks_state = self.tasks.state_dict()

    # ------------------------------------------------------------------ metrics
    def _write(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        if self.out_dir is not None:
            with writing(self.out_dir / "metrics.jsonl") as path, open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            flat = record.get("val", record)
            prefix = "val" if "val" in record else "train"
            for key in ("loss", "accuracy", "returns"):
                value = flat.get(key)
                if value is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", value[-1] if isinstance(value, list) else value,
                                           record["step"])

    def truncate_metrics(self) -> None:
        """Drop the records after ``self.step`` (written after the checkpoint that a resume starts
        from), so every step appears once in ``metrics.jsonl``."""
        path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        if path is None or not self.dist.is_main or not path.is_file():
            return
        kept = [json.dumps(record) for record in read_metrics(path) if record["step"] <= self.step]
        write_text(path, "".join(line + "\n" for line in kept))

    def _validation_due(self) -> bool:
        t = self.training
        return bool(self.val_tasks) and self.step > 0 and (self.step % t.eval_every == 0 or self.finished())

    def finished(self) -> bool:
        """Whether the run has done its ``meta_steps`` or spent its ``budget``."""
        t = self.training
        return self.step >= t.meta_steps or (t.budget is not None and self.budget_used >= t.budget)

    def _cosine_factor(self, step: int) -> float:
        """The cosine schedule's multiplier of ``meta_lr`` after ``step`` steps: it anneals to 0 over
        the planned steps or, with a ``budget``, over whichever of the two ends first."""
        t = self.training
        progress = step / t.meta_steps
        if t.budget is not None:
            progress = max(progress, self.budget_used / t.budget)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def validate(self, progress: bool = False):
        # a stop asked for during validation is taken between batches (not under torch.distributed,
        # where the ranks share the batches); the step is then validated again on resume
        should_stop = None if self.dist.enabled else (lambda: self.stop_request is not None)
        result = evaluate(self.learner, self.val_tasks, self.config.algorithm.inner_steps_test, device=self.device,
                          progress=progress and self.dist.is_main, desc=f"validate @ {self.step}",
                          should_stop=should_stop)
        if result is None:
            return None
        before, after = float(result.loss[0]), float(result.loss[-1])
        if not math.isfinite(after) or after > EXPLOSION_FACTOR * max(before, 1.0):
            raise self._diverged(f"the validation query loss after adapting is {after:.3g} ({before:.3g} before): "
                                 "the inner loop diverges", inner=True)
        self.validated_step = self.step
        if result.accuracy is not None:
            score = float(result.accuracy[-1])
        else:
            score = float(result.returns[-1]) if result.returns is not None else -float(result.loss[-1])
        self._write({"step": self.step, "val": result.as_dict()})
        if self.best is None or score > self.best:
            self.best, self.best_step = score, self.step
            self.best_model = {k: v.detach().clone() for k, v in self.learner.state_dict().items()}
            self.save("best.pt")
        return result

    # ------------------------------------------------------------------ the loop
    def _diverged(self, what: str, inner: bool = False) -> TrainingDiverged:
        """The error for a diverged run: what diverged, which option to lower, which file is kept."""
        inner_lr, meta_lr = self.config.algorithm.inner_lr, self.training.meta_lr
        last = self.out_dir / "last.pt" if self.out_dir is not None else None
        if last is not None and last.is_file():
            kept = f"; {last} (step {load_checkpoint(last)['step']}) holds the last finite weights"
        else:
            kept = "; no checkpoint was written before it"
        if inner:
            advice = f"lower --inner-lr (now {inner_lr:g})"
        else:
            advice = f"lower --meta-lr (now {meta_lr:g}) or --inner-lr (now {inner_lr:g}), or clip with --clip-grad"
        step = self.step if inner else self.step + 1
        return TrainingDiverged(f"{what} at step {step}: {advice}{kept}")

    def _check_loss(self, loss: float) -> None:
        """Stop on a non-finite meta-loss or one EXPLOSION_FACTOR times the first iteration's."""
        if not math.isfinite(loss):
            raise self._diverged(f"the meta-loss is {loss}")
        if self.first_loss is None:
            self.first_loss = loss
        limit = EXPLOSION_FACTOR * max(self.first_loss, 1.0)
        if loss > limit:
            raise self._diverged(f"the meta-loss exploded to {loss:.3g} (over {EXPLOSION_FACTOR:g} x the first "
                                 f"iteration's {self.first_loss:.3g})")

    def _stop(self, bar) -> None:
        """Save where the run is and raise ``Stopped``."""
        reason, code = self.stop_request
        path = self.save("last.pt")
        where = f"; {path} saved" if path is not None else ""
        bar.write(f"stopped at step {self.step} ({reason}){where}")
        raise Stopped(reason, code)

    def fit(self, progress: bool = True) -> "Trainer":
        t = self.training
        if self.out_dir is not None and self.dist.is_main:
            held = run_files(self.out_dir, RESULT_FILES)
            if held and not self.resumed:
                if not self.overwrite:
                    raise FileExistsError(already_a_run(self.out_dir, held, "Trainer.resume(path)",
                                                        "overwrite=True"))
                for name in held:
                    (self.out_dir / name).unlink()
            self.out_dir.mkdir(parents=True, exist_ok=True)
        tuner = None
        if t.threads:
            torch.set_num_threads(t.threads)
        elif self.device.type == "cpu" and not self.dist.enabled:
            tuner = self.thread_tuner = ThreadTuner()
        time_limit, every = t.time_limit, t.checkpoint_every
        started = self._saved_at = time.monotonic()
        bar = tqdm(total=t.meta_steps, initial=self.step, disable=not (progress and self.dist.is_main),
                   desc="meta-train", dynamic_ncols=True)
        try:
            if self._validation_due() and self.validated_step < self.step:  # it was interrupted
                self._validate_and_save(bar, progress)
            stream = iter(self.tasks)
            while not self.finished():
                if time_limit is not None and time.monotonic() - started >= time_limit and self.stop_request is None:
                    self.request_stop(f"time limit of {time_limit:g} s", 0)
                if self._stop_now():
                    self._stop(bar)
                start = time.perf_counter()
                batch = next(stream)
                if self.dist.enabled:
                    batch = batch[distributed.task_slice(batch.num_tasks, self.dist)]
                batch = batch.to(self.device, self.dtype)
                logging = (self.step + 1) % t.log_every == 0
                self.learner.on_step(self.step)
                checked = []

                def before_update(out):  # gradients averaged over processes, the guard before the update
                    distributed.average_gradients(self.learner.parameters(), self.dist)
                    checked.append(distributed.average(out.loss, self.dist).item())
                    self._check_loss(checked[-1])

                out = self.learner.train_step(batch, self.optimizer, per_step=logging, clip_grad=t.clip_grad,
                                              before_update=before_update)
                if not checked:  # an own train_step that skipped the hook: guard after the update
                    if self.dist.enabled:
                        raise RuntimeError(f"{type(self.learner).__name__}.train_step did not call before_update, "
                                           "which averages the gradients over processes: the ranks would drift apart")
                    checked.append(float(out.loss))
                    self._check_loss(checked[-1])
                loss = checked[-1]
                if not self.weights_finite():
                    raise self._diverged("the meta-parameters became non-finite")
                seconds = time.perf_counter() - start
                if tuner is not None:
                    tuner.step(seconds)
                if t.budget is not None:
                    self.budget_used += distributed.average(torch.tensor(seconds), self.dist).item()
                if self.scheduler:
                    self.scheduler.step()
                self.step += 1
                self._tasks_state = self.tasks.state_dict()
                self.step_seconds += seconds
                self.steps_run += 1
                bar.update(1)
                if logging:
                    seconds = time.perf_counter() - start
                    tasks = batch.num_tasks * self.dist.world_size
                    record = {"step": self.step, "loss": loss,
                              "query_loss": distributed.average(out.query_loss, self.dist).tolist(),
                              "time": seconds, "tasks_per_s": tasks / seconds, "threads": torch.get_num_threads()}
                    if hasattr(batch, "support_x"):
                        record["examples_per_s"] = (batch.support_x.shape[1] + batch.query_x.shape[1]) * tasks / seconds
                    if getattr(out, "task_return", None) is not None:  # meta-RL: returns and the step's KL
                        record["returns"] = distributed.average(out.task_return.mean(0), self.dist).tolist()
                        record["kl"], record["accepted"] = out.kl, out.accepted
                    postfix = {"loss": f"{loss:.3f}"}
                    if out.query_accuracy is not None:
                        accuracy = distributed.average(out.query_accuracy, self.dist)
                        record["accuracy"] = accuracy.tolist()
                        postfix["acc"] = f"{accuracy[-1].item():.3f}"
                    if "returns" in record:
                        postfix["return"] = f"{record['returns'][-1]:.2f}"
                    bar.set_postfix(postfix)
                    self._write(record)
                if self._validation_due():
                    self._validate_and_save(bar, progress)
                elif time.monotonic() - self._saved_at >= every:
                    self.save("last.pt")
        except KeyboardInterrupt:
            where = f"; checkpoint {self.save('last.pt')}" if self.out_dir else ""
            bar.write(f"interrupted at step {self.step}{where}")
            raise
        finally:
            bar.close()
        self.save("last.pt")
        return self

    def test(self, tasks, progress: bool = False):
        """Score the validation-selected weights (best.pt) on the test ``tasks``, and the final ones
        beside them when they differ: ``(report for test.json, result, final weights' result)``.
        A stop asked for meanwhile raises ``Stopped``: the test is run again on resume."""
        should_stop = None if self.dist.enabled else (lambda: self.stop_request is not None)

        def test(desc):
            result = evaluate(self.learner, tasks, self.config.algorithm.inner_steps_test, device=self.device,
                              progress=progress and self.dist.is_main, desc=desc, should_stop=should_stop)
            if result is None:
                raise Stopped(*self.stop_request)
            return result

        last_is_best = self.best_model is not None and self.best_step == self.step
        final = test("test (best.pt = last.pt)" if last_is_best else "test (last.pt)")
        report = {"checkpoint": "last.pt", "step": self.step, **final.as_dict()}
        result = final
        if self.best_model is not None:
            report.update(checkpoint="best.pt", step=self.best_step)
            if self.best_step != self.step:
                self.learner.load_state_dict(self.best_model)
                result = test("test (best.pt)")
                report = {"checkpoint": "best.pt", "step": self.best_step, **result.as_dict(),
                          "final": {"checkpoint": "last.pt", "step": self.step, **final.as_dict()}}
        return report, result, final

    def _validate_and_save(self, bar, progress: bool) -> None:
        if self.validate(progress) is None:  # stopped part-way: validated again on resume
            self._stop(bar)
        self.save("last.pt")
