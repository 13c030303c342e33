"""A meta-RL run from its configuration (``RunConfig`` with ``rl.env`` set): the learner, the
task stream and the fixed validation and test tasks, in the shapes the ``Trainer`` and
``evaluate`` take. The command line wires these in when ``--env`` is given."""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError, RunConfig
from .envs import family
from .maml_trpo import RULES, MAMLTRPO
from .policies import CategoricalMLPPolicy, GaussianMLPPolicy


class TaskParams:
    """A meta-batch of tasks as ``Trainer`` and ``evaluate`` handle one: ``tasks`` ``[T, P]``, the
    first of which is task ``first`` of the whole meta-batch (a process of a distributed run holds
    a slice; each task's sampling noise is keyed on its place in the whole)."""

    def __init__(self, tasks: torch.Tensor, first: int = 0):
        self.tasks, self.first = tasks, int(first)

    @property
    def num_tasks(self) -> int:
        return self.tasks.shape[0]

    def to(self, device=None, dtype=None) -> "TaskParams":
        return self  # environments step on the CPU, in their own precision

    def __getitem__(self, index: slice) -> "TaskParams":
        start = range(self.num_tasks)[index].start if isinstance(index, slice) else None
        if start is None or index.step not in (None, 1):
            raise TypeError("TaskParams takes a contiguous slice of its tasks")
        return TaskParams(self.tasks[index], self.first + start)


class TaskStream:
    """Meta-batches of ``batch_size`` tasks drawn from ``family``; batch ``i`` is a pure function of
    ``(seed, i)``, and ``state_dict`` records the position, so a resumed run draws the same tasks."""

    def __init__(self, family, batch_size: int, seed: int = 0):
        self.family, self.batch_size, self.seed, self.start = family, int(batch_size), int(seed), 0

    def batch(self, index: int) -> TaskParams:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return TaskParams(self.family.sample_tasks(self.batch_size, generator))

    def __iter__(self):
        while True:
            batch = self.batch(self.start)
            self.start += 1
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.start = int(state["seed"]), int(state["start"])


def ignored_options() -> dict:
    """The flat configuration keys a meta-RL run has no use for, each with why: everything that
    shapes a data set's episodes or images (it keeps ``task_batch`` and ``eval_batch``), every data
    set's own options, the image networks' settings and BatchNorm's. The command line warns of
    each one given beside ``--env``."""
    from ..config import DATASETS, DataConfig
    episodes = "a meta-RL run's tasks come from --env, not from a data set"
    out = {f.name: episodes for f in dataclasses.fields(DataConfig)
           if f.name not in ("dataset", "task_batch", "eval_batch", "options")}
    out.update({name: episodes for spec in DATASETS.values() for name in spec["options"]})
    out.update({name: "the policy is an MLP (--hidden, --activation)"
                for name in ("backbone", "widths", "drop_block", "pool", "norm", "network")})
    out["query_statistics"] = "the policy has no BatchNorm"
    return out


def check(config: RunConfig) -> RunConfig:
    """Refuse what a meta-RL run cannot do, in one line each (``ConfigError``)."""
    config.rl.check()
    family(config.rl.env, **({"workers": config.rl.workers} if _gym(config.rl.env) else {}))
    if config.algorithm.name not in RULES:
        raise ConfigError("algo", f"is {config.algorithm.name!r}; a meta-RL run's inner loop is one of "
                                  f"{', '.join(RULES)}", "AlgorithmConfig.name")
    if config.algorithm.inner_steps < 1:
        raise ConfigError("inner_steps", "must be at least 1 for a meta-RL run", "AlgorithmConfig.inner_steps")
    if config.training.device != "cpu":
        raise ConfigError("device", f"is {config.training.device!r}; meta-RL runs sample and train on the cpu "
                                    "(the policies are small, the environments step on the CPU)", "TrainingConfig.device")
    if config.rl.outer == "trpo":
        for key, value in (("cosine", config.training.cosine), ("clip_grad", config.training.clip_grad)):
            if value:
                raise ConfigError(key, "has no effect on a TRPO step, whose size max_kl sets (it applies to "
                                       "--outer ppo)", f"TrainingConfig.{key}")
    return config


def _gym(name: str) -> bool:
    from .envs import GymTaskFamily, families
    return issubclass(families().get(name, object), GymTaskFamily)


def build_learner(config: RunConfig) -> MAMLTRPO:
    """The policy and MAML-TRPO that ``config`` describes (the policy's two hidden layers are
    ``model.hidden`` wide, 100 if unset)."""
    check(config)
    r, a = config.rl, config.algorithm
    tasks = family(r.env, **({"workers": r.workers} if _gym(r.env) else {}))
    width = config.model.hidden or 100
    if tasks.num_actions is None:
        policy = GaussianMLPPolicy(tasks.observation_dim, tasks.action_dim, (width, width), r.activation)
    else:
        policy = CategoricalMLPPolicy(tasks.observation_dim, tasks.num_actions, (width, width), r.activation)
    learner = MAMLTRPO(policy, tasks, inner_lr=a.inner_lr, inner_steps=a.inner_steps, first_order=a.first_order,
                       rule=a.name, trajectories=r.trajectories, horizon=r.horizon, gamma=r.gamma,
                       gae_lambda=r.gae_lambda, outer=r.outer, max_kl=r.max_kl, cg_iters=r.cg_iters,
                       cg_damping=r.cg_damping, ls_steps=r.ls_steps, ls_ratio=r.ls_ratio, hvp_fraction=r.hvp_fraction,
                       seed=config.training.seed, inner_estimator=r.inner_estimator)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.model.dtype]
    return learner.to(dtype=dtype)


def build_tasks(config: RunConfig, splits=("train", "val", "test")) -> dict:
    """The training task stream and the fixed, seeded validation and test tasks."""
    tasks, out = family(config.rl.env), {}
    seed, batch = config.training.seed, config.data.eval_batch
    if "train" in splits:
        out["train"] = TaskStream(tasks, config.data.task_batch, seed)
    for split, count, offset in (("val", config.rl.val_tasks, 1), ("test", config.rl.test_tasks, 2)):
        if split in splits:
            drawn = tasks.sample_tasks(count, torch.Generator().manual_seed(seed + 1_000_000 * offset))
            out[split] = [TaskParams(part, batch * i) for i, part in enumerate(drawn.split(batch))]
    return out


def describe(config: RunConfig) -> str:
    r = config.rl
    return f"{config.data.task_batch} tasks x {r.trajectories} trajectories, {config.algorithm.inner_steps} inner step(s)"
