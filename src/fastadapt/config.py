"""A run's configuration: dataclasses (data, model, algorithm, training, and rl for meta-RL) in one ``RunConfig``.

Every checkpoint stores ``RunConfig.to_dict()``, so a run can be evaluated, resumed or used for
prediction without its command line. ``RunConfig.from_dict`` also reads the flat dicts of older
checkpoints and of the Python API (``dict(meta_lr=1e-3, steps=50)``): each flat key is the name of
a field (``steps`` and ``algo`` are kept as aliases of ``meta_steps`` and ``algorithm.name``) or of
an algorithm's own option. Errors are ``ConfigError``s that name the field in API terms
(``TrainingConfig.meta_steps``); the command line rewords them with its flags.

This module imports nothing else of fastadapt: every other layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


class ConfigError(ValueError):
    """A configuration value out of range. ``key``: the flat key (``meta_steps``), ``message``:
    what was expected, without the name (``must be a positive integer, got 0``)."""

    def __init__(self, key: str, message: str, where: Optional[str] = None):
        self.key, self.message = key, message
        super().__init__(f"{where or key} {message}")


@dataclass(frozen=True)
class Option:
    """A setting of one algorithm: its keyword argument, flat configuration key and command-line
    flag (``--`` and the name with dashes). ``default`` None means the algorithm's own choice;
    booleans become ``--name/--no-name``."""

    name: str
    type: type
    help: str
    default: Any = None
    choices: Tuple = ()
    minimum: Optional[float] = None  # numbers: the smallest allowed value
    positive: bool = False  # numbers: above zero

    def check(self, value, where: str):
        if value is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(self.name, f"must be True or False, got {value!r}", where)
            return value
        if self.choices and value not in self.choices:
            raise ConfigError(self.name, f"must be one of {', '.join(map(str, self.choices))}, got {value!r}", where)
        if self.type is int:
            _integer(self.name, value, where, minimum=self.minimum, positive=self.positive)
        elif self.type is float:
            value = _number(self.name, value, where, minimum=self.minimum, positive=self.positive)
        return value


def frame_fraction(value, where: str) -> float:
    """A drawing's frame (``DataConfig.frame``, ``ImageTransform.frame``): a fraction from 0.1 to 1,
    how much of the image the drawing's longer side fills; a smaller one would ask for a canvas
    many times the page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 1:
        raise ConfigError("frame", "must be a fraction from 0.1 to 1 (how much of the image a drawing's longer "
                                   f"side fills), got {value!r}", where)
    return float(value)


def _integer(key, value, where, minimum=None, positive=False):
    ok = isinstance(value, int) and not isinstance(value, bool)
    if positive and not (ok and value > 0):
        raise ConfigError(key, f"must be a positive integer, got {value!r}", where)
    if minimum is not None and not (ok and value >= minimum):
        wanted = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum:g}"
        raise ConfigError(key, f"must be {wanted}, got {value!r}", where)
    if not ok:
        raise ConfigError(key, f"must be an integer, got {value!r}", where)
    return value


def _number(key, value, where, minimum=None, positive=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if positive and not (ok and value > 0):
        raise ConfigError(key, f"must be a positive finite number, got {value!r}", where)
    if minimum is not None and not (ok and value >= minimum):
        wanted = "a non-negative finite number" if minimum == 0 else f"a finite number >= {minimum:g}"
        raise ConfigError(key, f"must be {wanted}, got {value!r}", where)
    if not ok:
        raise ConfigError(key, f"must be a finite number, got {value!r}", where)
    return float(value)


# Filled by each data set's ``DataSource`` when it is defined (``data/source.py``): its loss and
# its own options, so that flat keys reach ``DataConfig.options`` and the loss follows the data.
DATASETS: Dict[str, dict] = {}


def declare_dataset(name: str, loss: str = "cross_entropy", options: Tuple[Option, ...] = ()) -> None:
    DATASETS[name] = {"loss": loss, "options": {option.name: option for option in options}}


def _data_option_names() -> set:
    return {name for entry in DATASETS.values() for name in entry["options"]}


# Fields of DataConfig before the data sets declared their own options (0.1 checkpoints): now
# entries of DataConfig.options (Omniglot's and Glyphs').
LEGACY_DATA_FIELDS = ("train_alphabets", "val_alphabets", "test_alphabets", "rotations", "protocol", "glyph_classes")


@dataclass
class DataConfig:
    """Which tasks: the data set and the episode shape (``n_way`` classes, ``k_shot`` support and
    ``k_query`` query examples each, ``task_batch`` tasks per meta-batch), and the fixed
    validation and test tasks. ``image_size`` and ``channels`` default by data set."""

    dataset: str = "glyphs"
    root: Optional[str] = None
    download: bool = False
    n_way: int = 5
    k_shot: int = 1
    k_query: int = 15
    task_batch: int = 8
    image_size: Optional[int] = None
    channels: Optional[int] = None
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    test_split: Optional[str] = None
    augment: bool = False
    augment_strokes: bool = False  # handwriting: random stroke width and smooth warps
    group_by: Optional[str] = None
    drawers: Optional[str] = None  # "disjoint": training supports and queries by different drawers
    frame: Optional[float] = None  # drawings: crop to the ink, centred, its longer side this fraction of the image
    val_episodes: int = 100
    test_episodes: int = 600
    eval_batch: int = 25
    options: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """The shared fields, and ``options`` against the ones the data set declares."""
        where = "DataConfig."
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"must be one of {', '.join(sorted(DATASETS))}, got {self.dataset!r}",
                              where + "dataset")
        for key in ("n_way", "k_shot", "k_query", "task_batch", "val_episodes", "test_episodes", "eval_batch"):
            _integer(key, getattr(self, key), where + key, positive=True)
        for key in ("image_size", "channels"):
            if getattr(self, key) is not None:
                _integer(key, getattr(self, key), where + key, positive=True)
        if self.group_by not in (None, "alphabet"):
            raise ConfigError("group_by", f"must be None or 'alphabet', got {self.group_by!r}", where + "group_by")
        if self.drawers not in (None, "disjoint"):
            raise ConfigError("drawers", f"must be None or 'disjoint', got {self.drawers!r}", where + "drawers")
        if self.frame is not None:
            self.frame = frame_fraction(self.frame, where + "frame")
        known = DATASETS[self.dataset]["options"]
        for key, value in self.options.items():
            if key not in known:
                raise ConfigError(key, f"is not an option of data set {self.dataset!r} (its options: "
                                       f"{', '.join(known) or 'none'})", f"DataConfig.options[{key!r}]")
            self.options[key] = known[key].check(value, f"DataConfig.options[{key!r}]")


@dataclass
class ModelConfig:
    """The network: the ``backbone`` (``"conv4"`` with ``hidden`` filters and ``pool``, ``"max"``
    or ``"stride"`` by image size, and ``norm``, BatchNorm or TaskNorm-I; or ``"resnet12"`` with four ``widths``, default 64-160-320-640,
    and DropBlock's ``drop_block`` probability) and ``outputs`` head units (None: ``n_way``), or
    the reference code's config list ``network``; and the dtype of the weights."""

    hidden: Optional[int] = None
    pool: Optional[str] = None
    network: Any = None
    dtype: str = "float32"
    outputs: Optional[int] = None  # the head's units; None: the episodes' n_way
    backbone: str = "conv4"
    widths: Optional[List[int]] = None
    drop_block: float = 0.0
    init: Optional[str] = None  # the run or state-dict file the backbone was started from
    norm: str = "batch"  # conv4's normalisation: "batch" (BatchNorm) or "tasknorm" (TaskNorm-I)

    BACKBONES = ("conv4", "resnet12")
    NORMS = ("batch", "tasknorm")

    def check(self) -> None:
        if self.backbone not in self.BACKBONES:
            raise ConfigError("backbone", f"must be one of {', '.join(self.BACKBONES)}, got {self.backbone!r}",
                              "ModelConfig.backbone")
        if self.widths is not None:
            if isinstance(self.widths, tuple):
                self.widths = list(self.widths)
            if (not isinstance(self.widths, list) or len(self.widths) != 4
                    or not all(type(w) is int and w > 0 for w in self.widths)):
                raise ConfigError("widths", f"must be four positive integers (64,160,320,640), got {self.widths!r}",
                                  "ModelConfig.widths")
            if self.backbone != "resnet12":
                raise ConfigError("widths", "are ResNet-12's; conv4's width is hidden", "ModelConfig.widths")
        if not isinstance(self.drop_block, (int, float)) or isinstance(self.drop_block, bool) \
                or not 0.0 <= self.drop_block < 1.0:
            raise ConfigError("drop_block", f"must be a probability in [0, 1), got {self.drop_block!r}",
                              "ModelConfig.drop_block")
        if self.drop_block and self.backbone != "resnet12":
            raise ConfigError("drop_block", "is ResNet-12's DropBlock; conv4 has none", "ModelConfig.drop_block")
        if self.hidden is not None:
            _integer("hidden", self.hidden, "ModelConfig.hidden", positive=True)
        if self.outputs is not None:
            _integer("outputs", self.outputs, "ModelConfig.outputs", positive=True)
        if self.pool not in (None, "max", "stride"):
            raise ConfigError("pool", f"must be 'max' or 'stride', got {self.pool!r}", "ModelConfig.pool")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError("dtype", f"must be float32 or float64, got {self.dtype!r}", "ModelConfig.dtype")
        if self.norm not in self.NORMS:
            raise ConfigError("norm", f"must be one of {', '.join(self.NORMS)}, got {self.norm!r}", "ModelConfig.norm")
        if self.norm != "batch" and (self.backbone != "conv4" or self.network is not None):
            raise ConfigError("norm", f"{self.norm} is built into conv4 only", "ModelConfig.norm")


@dataclass
class AlgorithmConfig:
    """The meta-learner: the registered algorithm ``name`` and the settings the MAML family shares
    (``inner_steps`` SGD steps of ``inner_lr`` per task in training, ``inner_steps_test`` at test
    time), the engine's ``task_chunk`` and ``compile``, ``query_statistics`` (how BatchNorm
    normalises query images: ``"batch"``, a task's queries together, or ``"support"``, each with
    its support set's statistics; ``MetaLearner.query_statistics``), and ``options``, the
    algorithm's own settings (its ``Option``s, by name)."""

    name: str = "maml"
    inner_steps: int = 3
    inner_steps_test: int = 5
    inner_lr: float = 0.4
    first_order: bool = False
    task_chunk: Any = "auto"
    compile: bool = False
    query_statistics: str = "batch"
    options: Dict[str, Any] = field(default_factory=dict)

    def check(self, declared: Tuple[Option, ...] = ()) -> None:
        """The shared settings, and ``options`` against the algorithm's ``declared`` ones."""
        where = "AlgorithmConfig."
        for key in ("inner_steps", "inner_steps_test"):
            _integer(key, getattr(self, key), where + key, minimum=0)
        self.inner_lr = _number("inner_lr", self.inner_lr, where + "inner_lr", positive=True)
        if not (self.task_chunk is None or self.task_chunk == "auto"
                or (isinstance(self.task_chunk, int) and not isinstance(self.task_chunk, bool) and self.task_chunk > 0)):
            raise ConfigError("task_chunk", f"must be 'auto', None or a positive integer, got {self.task_chunk!r}",
                              where + "task_chunk")
        if self.query_statistics not in ("batch", "support"):
            raise ConfigError("query_statistics", f"must be 'batch' or 'support', got {self.query_statistics!r}",
                              where + "query_statistics")
        known = {o.name: o for o in declared}
        for key, value in self.options.items():
            if key not in known:
                raise ConfigError(key, f"is neither a field of the configuration (DataConfig, ModelConfig, "
                                       f"AlgorithmConfig, TrainingConfig) nor an option of algorithm {self.name!r} "
                                       f"(its options: {', '.join(known) or 'none'})",
                                  f"AlgorithmConfig.options[{key!r}]")
            self.options[key] = known[key].check(value, f"AlgorithmConfig.options[{key!r}]")


@dataclass
class TrainingConfig:
    """The outer loop: ``meta_steps`` meta-iterations of Adam at ``meta_lr`` (optionally cosine
    annealed and clipped), validation every ``eval_every`` and metrics every ``log_every``
    iterations, ``last.pt`` every ``checkpoint_every`` seconds, an optional ``time_limit`` in
    seconds, the seed, the device and torch's CPU ``threads``.

    ``time_limit`` stops one invocation safely (``last.pt`` saved, resumable, the schedule still
    planned over ``meta_steps``); ``budget`` is the run's length in seconds of meta-iterations
    (validation excluded, resumes included): the run ends there as if ``meta_steps`` were reached
    (final validation, test), and ``cosine`` anneals over whichever of the two ends first, which is
    what a comparison at equal wall-clock budgets needs."""

    meta_steps: int = 300
    meta_lr: float = 1e-3
    eval_every: int = 500
    log_every: int = 30
    cosine: bool = False
    clip_grad: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    checkpoint_every: float = 300.0
    time_limit: Optional[float] = None
    budget: Optional[float] = None

    def check(self) -> None:
        where = "TrainingConfig."
        for key in ("meta_steps", "eval_every", "log_every"):
            _integer(key, getattr(self, key), where + key, positive=True)
        _integer("seed", self.seed, where + "seed", minimum=0)
        if self.seed >= 2 ** 63:
            raise ConfigError("seed", f"must be below 2^63, got {self.seed!r}", where + "seed")
        self.meta_lr = _number("meta_lr", self.meta_lr, where + "meta_lr", positive=True)
        for key in ("clip_grad", "time_limit", "budget"):
            if getattr(self, key) is not None:
                setattr(self, key, _number(key, getattr(self, key), where + key, positive=True))
        if self.threads is not None:
            _integer("threads", self.threads, where + "threads", positive=True)
        self.checkpoint_every = _number("checkpoint_every", self.checkpoint_every, where + "checkpoint_every",
                                        minimum=0)


@dataclass
class RLConfig:
    """Meta-RL, when ``env`` names a task family (``fastadapt.rl.envs``) in place of a data set:
    ``trajectories`` per task and ``horizon`` per trajectory (None: the family's), the policy's
    ``activation`` (its two hidden layers are ``ModelConfig.hidden`` wide), returns (``gamma``,
    ``gae_lambda``), the outer step (``outer``: trpo or ppo; TRPO's ``max_kl``, ``cg_iters``,
    ``cg_damping``, ``ls_steps``, ``ls_ratio``, ``hvp_fraction``), the inner loss's ``inner_estimator``
    (``reinforce`` or ProMP's ``lvc``), gymnasium ``workers``, and the
    fixed validation and test tasks. The meta-batch is ``DataConfig.task_batch`` tasks; the
    inner loop is ``AlgorithmConfig``'s (``maml`` or ``metasgd``)."""

    env: Optional[str] = None
    trajectories: int = 20
    horizon: Optional[int] = None
    activation: str = "relu"
    gamma: float = 0.99
    gae_lambda: float = 1.0
    outer: str = "trpo"
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_steps: int = 15
    ls_ratio: float = 0.8
    hvp_fraction: float = 1.0
    inner_estimator: str = "reinforce"
    workers: int = 1
    val_tasks: int = 20
    test_tasks: int = 40

    INNER_ESTIMATORS = ("reinforce", "lvc")

    def check(self) -> None:
        where = "RLConfig."
        for key in ("trajectories", "cg_iters", "ls_steps", "workers", "val_tasks", "test_tasks"):
            _integer(key, getattr(self, key), where + key, positive=True)
        if self.horizon is not None:
            _integer("horizon", self.horizon, where + "horizon", positive=True)
        for key in ("gamma", "gae_lambda", "ls_ratio", "hvp_fraction"):
            value = _number(key, getattr(self, key), where + key, positive=True)
            if value > 1:
                raise ConfigError(key, f"must be in (0, 1], got {value!r}", where + key)
            setattr(self, key, value)
        self.max_kl = _number("max_kl", self.max_kl, where + "max_kl", positive=True)
        self.cg_damping = _number("cg_damping", self.cg_damping, where + "cg_damping", minimum=0)
        if self.activation not in ("relu", "tanh"):
            raise ConfigError("activation", f"must be relu or tanh, got {self.activation!r}", where + "activation")
        if self.outer not in ("trpo", "ppo"):
            raise ConfigError("outer", f"must be trpo or ppo, got {self.outer!r}", where + "outer")
        if self.inner_estimator not in self.INNER_ESTIMATORS:
            raise ConfigError("inner_estimator", f"must be one of {', '.join(self.INNER_ESTIMATORS)}, got "
                                                 f"{self.inner_estimator!r}",
                              where + "inner_estimator")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "algorithm": AlgorithmConfig, "training": TrainingConfig,
            "rl": RLConfig}


def _flat_fields() -> Dict[str, Tuple[str, str]]:
    """Flat key -> (section, field): every field by its name, except ``algo`` for the algorithm's
    name; ``steps`` is kept as an alias of ``meta_steps`` (the command line's ``--steps``)."""
    table = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name != "options":
                table["algo" if f.name == "name" else f.name] = (section, f.name)
    return table


FLAT_KEYS = _flat_fields()
ALIASES = {"steps": "meta_steps"}


@dataclass
class RunConfig:
    """Everything a run is: ``data``, ``model``, ``algorithm`` and ``training`` (and ``rl`` for a
    meta-RL run)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    @property
    def loss(self) -> str:
        """The data set's loss: ``"mse"`` for regression (sinusoid), else ``"cross_entropy"``."""
        return DATASETS.get(self.data.dataset, {}).get("loss", "cross_entropy")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[dict] = None) -> "RunConfig":
        """From ``to_dict()``'s nested form, or a flat dict of field names (older checkpoints, the
        Python API), where a key that is no field is taken as an algorithm option (``AlgorithmConfig.check``
        then refuses one that the algorithm does not declare). None values are skipped."""
        values = dict(values or {})
        if any(isinstance(values.get(s), dict) for s in SECTIONS):
            sections = {s: dict(values.get(s) or {}) for s in SECTIONS}
            sections["algorithm"]["options"] = dict(sections["algorithm"].get("options") or {})
            data = sections["data"]
            data["options"] = dict(data.get("options") or {})
            declared = DATASETS.get(data.get("dataset", "glyphs"), {}).get("options", {})
            for key in LEGACY_DATA_FIELDS:  # an older checkpoint stored every data set's, unset ones at defaults
                if key in data:
                    value = data.pop(key)
                    if key in declared and value not in (None, False) and not (key == "glyph_classes" and value == 200):
                        data["options"][key] = value
            for name, part in sections.items():
                unknown = set(part) - {f.name for f in dataclasses.fields(SECTIONS[name])}
                if unknown:
                    raise ConfigError(sorted(unknown)[0], f"is not a field of {SECTIONS[name].__name__}")
            return cls(**{s: SECTIONS[s](**sections[s]) for s in SECTIONS})
        return cls().updated(values)

    def updated(self, flat: dict) -> "RunConfig":
        """A copy with the flat keys of ``flat`` set (None values skipped)."""
        out = RunConfig.from_dict(self.to_dict())
        for key, value in flat.items():
            if value is None:
                continue
            key = ALIASES.get(key, key)
            if key in FLAT_KEYS:
                section, name = FLAT_KEYS[key]
                setattr(getattr(out, section), name, value)
            elif key == "options" and isinstance(value, dict):
                out.algorithm.options.update(value)
            elif key in LEGACY_DATA_FIELDS or key in _data_option_names():
                out.data.options[key] = value
            else:
                out.algorithm.options[key] = value
        return out

    def flat(self) -> dict:
        """Every field by its flat key, with the data set's and the algorithm's options beside them."""
        out = {key: getattr(getattr(self, section), name) for key, (section, name) in FLAT_KEYS.items()}
        return {**out, **self.data.options, **self.algorithm.options}
