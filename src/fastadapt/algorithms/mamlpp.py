"""MAML++ (Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import ConfigError, Option
from . import forward
from .functional import batch_statistics, detach
from .maml import MAML


class MAMLPlusPlus(MAML):
    """MAML with the MAML++ options, each usable alone:

    - ``multi_step_loss=N``: the meta-loss weighs the query loss after every step, starting
      uniform and annealed over N meta-iterations towards the last step (the paper's schedule:
      earlier steps decay to 0.03/steps each, the last grows to take the rest);
    - ``lslr=True``: a learned inner learning rate per parameter tensor and per step, initialised
      to ``inner_lr`` (test-time steps beyond ``inner_steps`` reuse the last step's rates);
    - ``first_order_until=N``: derivative-order annealing, first order for the first N
      meta-iterations and second order after;
    - ``per_step_bn=True``: per-step BatchNorm weights and biases, meta-learned and not adapted
      in the inner loop (the pass at step 0 uses the model's own; steps 1.. have their own rows),
      and per-step running statistics, recorded while meta-training (``record_statistics``). They
      are used when ``bn_statistics="running"``: every pass at step s then normalises with step s's
      statistics instead of its own batch's, so a single image is classified the same alone or in
      a batch (non-transductive). The default, ``"batch"``, keeps the transductive policy. The
      pass that scores the weights after step s+1 uses step s's entries; test-time steps past
      ``inner_steps`` reuse the last;
    - cosine annealing of the meta learning rate is the Trainer's ``cosine`` option.

    ``--algo mamlpp`` turns every option on (``from_config``); ``--no-lslr`` and the like turn one off.
    It extends ``maml`` and ``fomaml``: ``--algo maml --lslr`` is MAML with just that option.
    """

    name = "mamlpp"
    summary = "MAML++ (Antoniou et al. 2019), every option on"
    extends = ("maml", "fomaml")
    options = (
        Option("multi_step_loss", int, "MAML++: anneal per-step query-loss weights over N iterations "
                                       "(mamlpp: a tenth of the run)", minimum=0),
        Option("lslr", bool, "MAML++: learned per-layer per-step inner rates (mamlpp: on)"),
        Option("first_order_until", int, "MAML++: first order for the first N meta-iterations (mamlpp: a third "
                                         "of the run)", minimum=0),
        Option("per_step_bn", bool, "MAML++: per-step BatchNorm weights and running statistics (mamlpp: on "
                                    "when the network has BatchNorm)"),
        Option("bn_statistics", str, "BatchNorm: each batch's own statistics (batch, default) or per-step "
                                     "running ones (running; needs per-step BatchNorm)", choices=("batch", "running")),
    )

    @classmethod
    def from_base_config(cls, model, config, base):
        """``--algo maml --lslr``: MAML (first order for ``fomaml``) with just the options chosen."""
        return cls.from_config(model, config, everything=False, first_order=base.name == "fomaml")

    @classmethod
    def from_config(cls, model, config, everything: bool = True, first_order: bool = False):
        """``everything``: the options left unset take MAML++'s values (``--algo mamlpp``); else off.
        The schedules' lengths are this project's choice (the paper counts epochs): the multi-step
        loss is annealed over the first 10% of training, first order for the first third."""
        a, steps = config.algorithm, config.training.meta_steps
        on = dict(multi_step_loss=max(1, steps // 10), lslr=True, first_order_until=steps // 3,
                  per_step_bn=any(isinstance(m, _BatchNorm) for m in model.modules()))
        chosen = {key: a.options.get(key) if a.options.get(key) is not None else (value if everything else type(value)())
                  for key, value in on.items()}
        derived = [key for key in ("multi_step_loss", "first_order_until") if a.options.get(key) is None]
        if everything and derived and config.training.budget is not None:
            warnings.warn(f"mamlpp: {' and '.join(derived)} default to fractions of meta_steps ({steps}), but the "
                          f"run ends at its budget of {config.training.budget:g} s; set them in iterations "
                          "(--multi-step-loss, --first-order-until) for the iterations the budget allows",
                          stacklevel=2)
        if a.options.get("bn_statistics") == "running" and not chosen["per_step_bn"]:
            raise ConfigError("bn_statistics", "is 'running', which reads per-step statistics recorded in "
                                               "meta-training: it needs a run trained with per-step BatchNorm "
                                               "(per_step_bn; --per-step-bn or --algo mamlpp)",
                              "AlgorithmConfig.options['bn_statistics']")
        return cls(model, a.inner_lr, a.inner_steps, first_order=a.first_order or first_order, loss=config.loss,
                   task_chunk=a.task_chunk, compile=a.compile, bn_statistics=a.options.get("bn_statistics") or "batch",
                   **chosen)

    def __init__(self, model, inner_lr: float = 0.4, inner_steps: int = 5, first_order: bool = False,
                 loss="cross_entropy", task_chunk="auto", compile: bool = False, multi_step_loss: int = 0,
                 lslr: bool = False, first_order_until: int = 0, per_step_bn: bool = False,
                 bn_statistics: str = "batch", bn_momentum: float = 0.1, classification=None):
        super().__init__(model, inner_lr, inner_steps, first_order=first_order, loss=loss, task_chunk=task_chunk,
                         compile=compile, classification=classification)
        self.multi_step_loss, self.first_order_until = int(multi_step_loss), int(first_order_until)
        self.step_lrs: Optional[nn.Parameter] = None
        if lslr:
            tensors = len(list(model.parameters()))
            self.step_lrs = nn.Parameter(torch.full((max(inner_steps, 1), tensors), self.inner_lr))
        self.per_step_bn = bool(per_step_bn)
        self.bn_momentum = float(bn_momentum)
        self.bn_statistics = bn_statistics
        self._bn_names = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        if self.per_step_bn:
            self._init_per_step_bn(model)

    def _init_per_step_bn(self, model) -> None:
        if not self._bn_names:
            raise ValueError("per_step_bn=True: the model has no BatchNorm layer")
        if any(hasattr(m, "normalise") for m in model.modules()):
            raise ValueError("per-step BatchNorm (MAML++'s, on with --algo mamlpp) records running statistics, which "
                             "TaskNorm (--norm tasknorm) does not keep; add --no-per-step-bn")
        rows = max(self.inner_steps, 1)
        modules = dict(model.named_modules())
        weights, biases = [], []
        for index, name in enumerate(self._bn_names):
            bn = modules[name]
            if not bn.affine:
                raise ValueError(f"per_step_bn=True: BatchNorm layer {name!r} has no weights (affine=False)")
            weights.append(nn.Parameter(bn.weight.detach().repeat(rows - 1, 1)))
            biases.append(nn.Parameter(bn.bias.detach().repeat(rows - 1, 1)))
            self.register_buffer(f"bn_running_mean_{index}", torch.zeros(rows, bn.num_features))
            self.register_buffer(f"bn_running_var_{index}", torch.ones(rows, bn.num_features))
        self.bn_step_weights, self.bn_step_biases = nn.ParameterList(weights), nn.ParameterList(biases)

    @property
    def bn_statistics(self) -> str:
        return self._bn_statistics

    @bn_statistics.setter
    def bn_statistics(self, value: str) -> None:
        if value not in ("batch", "running"):
            raise ValueError(f"bn_statistics must be 'batch' or 'running', got {value!r}")
        if value == "running" and not self.per_step_bn:
            raise ValueError("bn_statistics='running' needs per_step_bn=True (the statistics it reads are "
                             "recorded per step during meta-training)")
        self._bn_statistics = value

    def forward_policy(self) -> forward.ForwardPolicy:
        return forward.ForwardPolicy(statistics=self._bn_statistics)

    def initial_weights(self, params):
        return self.step_view(params, 0)

    def step_view(self, params, step):
        """The weights of a pass at inner step ``step``: the step's rows of the per-step BatchNorm
        weights (from step 1) and, in running mode, of the running statistics, which
        ``functional_call`` substitutes for the BatchNorm modules' own."""
        if not self.per_step_bn:
            return params
        row = min(step, max(self.inner_steps, 1) - 1)
        view = dict(params)
        for index, name in enumerate(self._bn_names):
            if row > 0:
                view[f"{name}.weight"] = self.bn_step_weights[index][row - 1]
                view[f"{name}.bias"] = self.bn_step_biases[index][row - 1]
            if self._bn_statistics == "running":
                view[f"{name}.running_mean"] = getattr(self, f"bn_running_mean_{index}")[row]
                view[f"{name}.running_var"] = getattr(self, f"bn_running_var_{index}")[row]
        return view

    def _adapted(self, name: str) -> bool:
        """Whether the inner loop updates the parameter ``name`` (per-step BatchNorm weights are
        chosen per step instead)."""
        return not (self.per_step_bn and name.rpartition(".")[0] in self._bn_names)

    def _inner_rate(self, step: int, index: int):
        """The inner learning rate of the ``index``-th parameter tensor at ``step`` (LSLR: learned,
        steps past the trained ones reuse the last row)."""
        if self.step_lrs is None:
            return self.inner_lr
        return self.step_lrs[min(step, self.step_lrs.shape[0] - 1), index]

    def inner_loop(self, params, buffers, support_x, support_y, steps, create_graph):
        fast = params
        yield self.step_view(fast, 0)
        for step in range(steps):
            grads = self.support_grad(self.step_view(fast, step), buffers, support_x, support_y, create_graph)
            fast = {name: w - self._inner_rate(step, index) * grads[name] if self._adapted(name) else w
                    for index, (name, w) in enumerate(fast.items())}
            yield self.step_view(fast, step)

    def create_graph(self) -> bool:
        return not self.first_order and self.iteration >= self.first_order_until

    def step_loss_weights(self, steps: int) -> Optional[torch.Tensor]:
        if not self.multi_step_loss or steps <= 1:
            return None  # one step: the multi-step loss is the plain one
        progress = min(self.iteration / self.multi_step_loss, 1.0)
        floor = 0.03 / steps
        weights = torch.full((steps,), max((1.0 - progress) / steps, floor))
        weights[-1] = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
        return weights.to(next(iter(self.model.parameters())))

    @torch.no_grad()
    def record_statistics(self, batch) -> None:
        """Fold the BatchNorm statistics of every pass that uses step s's row into row s of the
        per-step running statistics, over the first chunk of ``batch`` (first-order steps; no graph).

        Row s serves two passes: the support pass at step s (weights after s steps) and the pass
        that scores the weights after step s+1 (the query set). Both are recorded and averaged,
        as MAML++'s own code folds both into the running statistics; recording the support passes
        alone normalised the scoring passes with statistics of the weights before the step, and
        running-statistics accuracy fell apart (40.7% -> 29.8% over two steps where batch statistics
        gave 75.2%, Omniglot 5-way 1-shot, 150 iterations)."""
        part = self.task_chunks(batch, with_graph=True)[0]  # the meta-gradient's first chunk
        params, buffers = detach(self.meta_params()), self.model_buffers()
        rows = max(self.inner_steps, 1)
        mode, self._bn_statistics = self._bn_statistics, "batch"

        def statistics_of_one_task(support_x, support_y, query_x):
            weights = list(self.inner_loop(params, buffers, support_x, support_y, rows, False))
            means, variances = [], []
            for step in range(rows):
                support = batch_statistics(self.model, self.step_view(weights[step], step), buffers, support_x)
                scoring = batch_statistics(self.model, weights[step + 1], buffers, query_x)  # carries row ``step``
                means.append([(a[0] + b[0]) / 2 for a, b in zip(support, scoring)])
                variances.append([(a[1] + b[1]) / 2 for a, b in zip(support, scoring)])
            layers = len(self._bn_names)
            return ([torch.stack([m[i] for m in means]) for i in range(layers)],
                    [torch.stack([v[i] for v in variances]) for i in range(layers)])

        try:
            with self.forward_context():
                means, variances = torch.func.vmap(statistics_of_one_task, randomness="different")(
                    part.support_x, part.support_y, part.query_x)
        finally:
            self._bn_statistics = mode
        for index in range(len(self._bn_names)):
            for kind, values in (("mean", means[index]), ("var", variances[index])):
                running = getattr(self, f"bn_running_{kind}_{index}")
                running.lerp_(values.mean(0).to(running.dtype), self.bn_momentum)

    def before_meta_batch(self, batch) -> None:
        if self.per_step_bn:
            self.record_statistics(batch)
