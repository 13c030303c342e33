"""The training loop: meta-optimiser, schedule, evaluation, checkpoints and metrics.

Read top to bottom: ``Trainer.fit`` draws a meta-batch, accumulates its meta-gradient
(``learner.meta_backward``), steps Adam, logs every ``log_every`` steps, evaluates on fixed
validation tasks every ``eval_every`` steps, and writes ``last.pt`` (and ``best.pt``). Everything
needed to continue exactly where it stopped is in the checkpoint: model, optimiser and schedule
state, step, configuration, torch RNG state and the task stream's position.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate


class TrainingDiverged(RuntimeError):
    """The meta-loss became NaN or infinite; the last good checkpoint is kept."""


class Trainer:
    def __init__(self, learner, tasks, config: dict, out_dir=None, val_tasks=None, dist_context=None,
                 writer=None, transform=None, class_names=None):
        self.learner, self.tasks, self.config = learner, tasks, dict(config)
        # What turned files into the training tensors, and the training classes: stored in every
        # checkpoint so prediction reads a user's files the same way. By default the task
        # source's data set's (an EpisodeSampler's).
        dataset = getattr(tasks, "dataset", None)
        self.transform = transform if transform is not None else getattr(dataset, "transform", None)
        self.class_names = class_names if class_names is not None else getattr(dataset, "class_names", None)
        self.writer = writer  # e.g. torch.utils.tensorboard.SummaryWriter: anything with add_scalar
        # Under torchrun each rank trains on its share of every meta-batch (fastadapt.distributed).
        self.dist = dist_context or distributed.current()
        self.val_tasks = val_tasks
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = torch.device(config.get("device", "cpu"))
        self.dtype = next(learner.parameters()).dtype
        self.optimizer = learner.make_optimizer(config["meta_lr"])
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config["steps"])
                          if config.get("cosine") else None)
        self.step = 0
        # time in the meta-iterations this process ran (validation excluded), and how many it ran
        self.step_seconds, self.steps_run = 0.0, 0
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_model: Optional[dict] = None  # a copy of the weights that scored ``best``
        self._tasks_state = tasks.state_dict()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        from . import __version__
        return {
            "model": self.learner.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "step": self.step, "best": self.best, "config": self.config, "rng": torch.get_rng_state(),
            "tasks": self._tasks_state, "version": __version__, "best_step": self.best_step,
            "transform": self.transform.to_dict() if self.transform is not None else None,
            "class_names": self.class_names,
        }

    def save(self, name: str = "last.pt") -> Optional[Path]:
        if self.out_dir is None or not self.dist.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.out_dir / name)

    def resume(self, path) -> None:
        state = load_checkpoint(path)
        self.learner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.best_step = int(state["step"]), state["best"], state.get("best_step")
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
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            flat = record.get("val", record)
            prefix = "val" if "val" in record else "train"
            for key in ("loss", "accuracy"):
                value = flat.get(key)
                if value is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", value[-1] if isinstance(value, list) else value,
                                           record["step"])

    def validate(self):
        result = evaluate(self.learner, self.val_tasks, self.config["inner_steps_test"], device=self.device)
        score = float(result.accuracy[-1]) if result.accuracy is not None else -float(result.loss[-1])
        self._write({"step": self.step, "val": result.as_dict()})
        if self.best is None or score > self.best:
            self.best, self.best_step = score, self.step
            self.best_model = {k: v.detach().clone() for k, v in self.learner.state_dict().items()}
            self.save("best.pt")
        return result

    # ------------------------------------------------------------------ the loop
    def fit(self, progress: bool = True) -> "Trainer":
        c = self.config
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        stream = iter(self.tasks)
        bar = tqdm(total=c["steps"], initial=self.step, disable=not (progress and self.dist.is_main),
                   desc="meta-train", dynamic_ncols=True)
        try:
            while self.step < c["steps"]:
                start = time.perf_counter()
                batch = next(stream)
                if self.dist.enabled:
                    batch = batch[distributed.task_slice(batch.num_tasks, self.dist)]
                batch = batch.to(self.device, self.dtype)
                logging = (self.step + 1) % c["log_every"] == 0
                self.optimizer.zero_grad(set_to_none=True)
                self.learner.on_step(self.step)
                out = self.learner.meta_backward(batch, per_step=logging)
                distributed.average_gradients(self.learner.parameters(), self.dist)
                loss = distributed.average(out.loss, self.dist).item()
                if not math.isfinite(loss):
                    kept = f"; the last good checkpoint {self.out_dir / 'last.pt'} is kept" if self.out_dir else ""
                    raise TrainingDiverged(f"meta-loss is {loss} at step {self.step + 1}: training stopped{kept}")
                if c.get("clip_grad"):
                    torch.nn.utils.clip_grad_norm_(self.learner.parameters(), c["clip_grad"])
                self.optimizer.step()
                if self.scheduler:
                    self.scheduler.step()
                self.step += 1
                self._tasks_state = self.tasks.state_dict()
                self.step_seconds += time.perf_counter() - start
                self.steps_run += 1
                bar.update(1)
                if logging:
                    seconds = time.perf_counter() - start
                    tasks = batch.num_tasks * self.dist.world_size
                    record = {"step": self.step, "loss": loss,
                              "query_loss": distributed.average(out.query_loss, self.dist).tolist(),
                              "time": seconds, "tasks_per_s": tasks / seconds,
                              "examples_per_s": (batch.support_x.shape[1] + batch.query_x.shape[1]) * tasks / seconds}
                    postfix = {"loss": f"{loss:.3f}"}
                    if out.query_accuracy is not None:
                        accuracy = distributed.average(out.query_accuracy, self.dist)
                        record["accuracy"] = accuracy.tolist()
                        postfix["acc"] = f"{accuracy[-1].item():.3f}"
                    bar.set_postfix(postfix)
                    self._write(record)
                if self.val_tasks and (self.step % c["eval_every"] == 0 or self.step == c["steps"]):
                    self.validate()
                    self.save("last.pt")
        except KeyboardInterrupt:
            where = f"; checkpoint {self.save('last.pt')}" if self.out_dir else ""
            bar.write(f"interrupted at step {self.step}{where}")
            raise
        finally:
            bar.close()
        self.save("last.pt")
        return self
