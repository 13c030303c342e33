"""The sinusoid regression tasks of the MAML paper (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

import math

import torch

from .episodes import TaskBatch
from .source import DataSource


class Sinusoid:
    """Tasks ``y = A sin(x - phase)``, A ~ U(amplitude), phase ~ U(phase), x ~ U(x_range).

    Each task has ``k_shot`` support and ``k_query`` query points; targets carry a feature axis
    (``support_y`` is ``[T, k_shot, 1]``). The stream of tasks is reproducible for a seed; the task
    parameters of the last ``sample`` are kept in ``last_amplitude`` / ``last_phase``. Iterating
    yields meta-batches of ``batch_size`` tasks forever; ``state_dict`` captures the stream's position.
    """

    def __init__(self, k_shot: int = 10, k_query: int = 10, amplitude=(0.1, 5.0),
                 phase=(0.0, math.pi), x_range=(-5.0, 5.0), seed: int = 0, batch_size: int = 25):
        if k_shot <= 0 or k_query <= 0:
            raise ValueError(f"Sinusoid: k_shot and k_query must be positive, got {k_shot}, {k_query}")
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"Sinusoid: {name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.seed, self.batch_size = seed, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, bounds, *shape):
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(*shape, generator=self.generator)

    def sample(self, batch_size: int) -> TaskBatch:
        if batch_size <= 0:
            raise ValueError(f"Sinusoid.sample: batch_size must be positive, got {batch_size}")
        amp = self._uniform(self.amplitude, batch_size, 1, 1)
        phase = self._uniform(self.phase, batch_size, 1, 1)
        x = self._uniform(self.x_range, batch_size, self.k_shot + self.k_query, 1)
        y = amp * torch.sin(x - phase)
        self.last_amplitude, self.last_phase = amp.flatten(), phase.flatten()
        s = self.k_shot
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


    def __iter__(self):
        while True:
            yield self.sample(self.batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


class SinusoidSource(DataSource):
    """The MAML paper's sinusoid regression as a run's data set: K = ``k_shot`` support points."""

    name = "sinusoid"
    summary = "the MAML paper's sinusoid regression (K = --k-shot points)"
    needs_root = False
    loss = "mse"
    network = "mlp"
    ignores = {**{key: "the sinusoid tasks are regression of K points" for key in
                  ("n_way", "image_size", "channels", "augment", "augment_strokes", "group_by", "drawers", "frame",
                   "hidden")},
               "query_statistics": "its network has no BatchNorm"}

    @classmethod
    def default_transform(cls, config):
        return None

    @classmethod
    def describe(cls, config):
        return f"regression, K={config.data.k_shot}"

    @classmethod
    def tag(cls, config):
        return f"k{config.data.k_shot}"

    @classmethod
    def build(cls, config, splits=("train", "val", "test")):
        d, seed, out = config.data, config.training.seed, {}
        if "train" in splits:
            out["train"] = Sinusoid(d.k_shot, d.k_query, seed=seed, batch_size=d.task_batch)
        for split, count, offset in (("val", d.val_episodes, 1), ("test", d.test_episodes, 2)):
            if split in splits:
                tasks = Sinusoid(d.k_shot, d.k_query, seed=seed + offset).sample(count)
                out[split] = list(tasks.split(min(d.eval_batch, count)))
        return out
