"""Typed run configuration: one dataclass per component, loaded from YAML, overridden with --set.

The allowed values of a choice field are the ``Literal`` type of the registry that implements them
(trainer/scorers.py, trainer/posterior.py, ...): adding an implementation there is what makes a value valid.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sharding.launch import Backend, DeviceChoice
from sharding.row_optim import RowOptimizerName
from storage.atomic import atomic_write_text
from storage.dataset import DataConfig
from trainer.evaluate import EvalProtocol
from trainer.likelihood import LikelihoodName, NegativeSource
from trainer.objective import KLSchedule, Regulariser
from trainer.posterior import KLEstimator, Latent
from trainer.scorers import ScorerName


@dataclass(kw_only=True)
class ModelConfig:
    scorer: ScorerName = "complex"
    """Scoring layer on top of the embeddings: distmult or complex (see trainer/scorers.py)."""
    latent: Latent = "lim"
    """lim: separate Gaussian latents for entities and relations, KL over all of them;
    lfm: one latent set, KL over the embeddings of each batch's facts; point: non-variational."""
    dim: int = 128
    """Real numbers per embedding mean (ComplEx uses dim/2 complex dimensions)."""
    init_logvar: float | None = None
    """Initial log-variance of every posterior; None means log(1/dim), as the authors' code did."""
    prior: Literal["unit", "1/dim"] = "unit"
    """The prior of every embedding: unit, N(0, I) (the paper's); 1/dim, N(0, I/dim), what the authors'
    published runs used (a flag parsed wrongly)."""
    init_std: float | None = None
    """Std of the normal init of the means; None means Xavier/Glorot, sqrt(2/(rows+dim))."""
    separate_roles: bool = False
    """Give each entity a subject and an object embedding (2 x dim numbers per mean), scored as
    scorer(s_subject, r, o_object): a CP model, what the authors' published runs trained (a flag parsed
    wrongly). Off: one embedding per entity, the paper's model."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    likelihood: LikelihoodName = "softmax"
    """bernoulli: the paper's sigmoid likelihood with sampled negatives (Propositions 2/4);
    softmax: 1-vs-all multinomial over all entities with reciprocal relations; sampled_softmax: the same
    multinomial with log Z estimated from sampled and in-batch negatives (what scales)."""
    num_negatives: int = 32
    """Bernoulli: k corruptions per positive, k//2 heads and the rest tails (k = 1 corrupts tails only, as
    the authors' code did); sampled_softmax:
    k uniform candidates shared by a chunk's head and tail queries."""
    negative_chunk: int = 256
    """Positives sharing one draw of negatives (Bernoulli, sampled_softmax), so scoring is one matrix product."""
    in_batch_negatives: bool = True
    """sampled_softmax only: the chunk's own answers join its uniform negatives."""
    negative_weight: float | None = None
    """Weight 1/b- of each negative; None means |D-|/|D+| per sample = 2(Ne-1)/k (Prop. 2/4)."""
    exclude_positives: bool = False
    """Bernoulli: a negative that is its own positive's head (for a head corruption) or tail (for a tail
    corruption) is a true fact, not a negative: it is left out of the data term."""
    adversarial_temperature: float = 0.0
    """Bernoulli: self-adversarial weighting (Sun et al., 2019, RotatE): a positive's negatives on each side
    share their total weight in proportion to softmax(temperature * score), held constant in the gradient,
    so the hard negatives carry it; 0 weighs them equally (the ELBO's estimator)."""
    split_by_position: bool = False
    """Bernoulli, for reproducing the authors' published runs (not the ELBO): their code lays a batch out as
    each positive followed by its k negatives and weighs the first B rows 1 and every later row 1/b-, by
    position, not by label, so most positives carry the negatives' weight (``position_weights``)."""
    relation_bias: bool = False
    """Bernoulli: add a learned bias per relation (a point estimate) to every score, so a relation can call
    all corruptions unlikely without moving its embeddings; it cancels in a softmax, so it leaves ranks as
    they are and moves only the probabilities."""
    kl_estimator: KLEstimator = "full"
    """LIM only. full: KL of the whole entity table each batch, weighted by the schedule;
    per_occurrence: each positive's entities carry KL/frequency, so an epoch sums to the full KL
    and an update touches only the batch's rows (what scales)."""
    kl_schedule: KLSchedule = "uniform"
    """Share of the epoch's KL taken by batch i of M: uniform (1/M) or compression (2^(M-i)/(2^M-1),
    Blundell et al.)."""
    kl_warmup: float = 0.0
    """Fraction of the epochs trained with KL off (the authors used 0.1)."""
    kl_weight: float = 1.0
    """Multiplier of the KL term; 1 is the ELBO."""
    reg: Regulariser = "none"
    """Extra regulariser on the batch's mean embeddings: none, or n3 (nuclear 3-norm, for point baselines)."""
    reg_weight: float = 0.0
    """Weight of reg."""


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: RowOptimizerName = "adam"
    """adam (lazy/row-wise Adam on entity rows, equal to Adam when all rows are in the batch) or
    rowwise_adagrad (one accumulator per row, as PyTorch-BigGraph)."""
    lr: float = 0.01
    """Learning rate for entities and relations."""
    lr_decay: float = 1.0
    """Multiply the learning rate by this when the validation MRR has not improved for ``lr_patience``
    evaluations in a row (reduce-on-plateau; 1.0 keeps it constant)."""
    lr_patience: int = 1
    """Evaluations in a row without a better validation MRR before the learning rate is multiplied by
    ``lr_decay``."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None disables."""
    clip_sigma_norm: float | None = None
    """After every update, scale each updated row's sigma so its L2 norm is at most this, as the authors'
    code did with 1.0 (with log(1/dim) as the initial log-variance, sigma starts at norm 1); None disables."""


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 100
    """Passes over the training facts."""
    batch_size: int = 1024
    """Positive facts per step."""
    seed: int = 0
    """Seeds init, shuffling, negatives and reparameterisation noise; saved with the run."""
    eval_every: int = 20
    """Evaluate on valid every this many epochs (0: only at the end); the best checkpoint is kept."""
    checkpoint_every: int = 10
    """Write the resumable checkpoint every this many epochs (and always at the end)."""
    time_budget_s: float | None = None
    """Stop before an epoch that would end past this many seconds of training (None: run all epochs)."""
    num_threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""
    device: DeviceChoice = "auto"
    """Where rows, batches and the step live: auto (this worker's CUDA device if there is one, else cpu),
    cpu, or cuda."""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matrix products (torch.set_float32_matmul_precision): highest is full fp32; high lets CUDA
    use TF32 tensor cores (Ampere and newer), medium also bf16. It governs the scoring products of a step
    and evaluation's score matrix; parameters, KL, gradients and the optimiser stay fp32. On the CPU torch
    changes nothing unless the CPU has bf16 matrix units."""
    progress: bool = True
    """Show a tqdm progress bar with ELBO / KL / NLL."""
    on_divergence: Literal["stop", "rollback"] = "stop"
    """When a loss, gradient or parameter is not finite: stop with an error naming the epoch and step, or
    roll back to the latest checkpoint (the initial values when there is none) with half the learning rate."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one process before the run stops (on_divergence=rollback)."""
    log_steps: bool = False
    """Also write steps.jsonl: one line per global step (epoch, step, nll, kl, loss, summed over workers)."""
    written_gradients: bool = True
    """Write a step's gradients out where the compiled Bernoulli kernel allows it (the same numbers as tracing
    them, bit for bit, in less time; docs/model.md); false traces every step, to check one against the other."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without a better validation MRR (None: never); the
    final evaluation uses the best checkpoint either way."""


@dataclass(kw_only=True)
class ShardingConfig:
    negatives: NegativeSource = "global"
    """Bernoulli negatives: global (uniform over all entities) or local (uniform over this worker's own
    entity shard: no row exchange for them; uniform overall since shards are equal contiguous id ranges)."""
    block_rows: int = 1024
    """Shard boundaries fall on multiples of this many rows; initial values and dense noise are drawn
    per block, so they do not depend on the number of workers."""
    streams: int | None = None
    """Data streams per global step (a multiple of the world size; None: one per worker). Each stream
    reads a disjoint share of the training row groups and contributes batch_size/streams positives to
    every step, so runs with the same streams see the same batches at any world size."""
    backend: Backend = "auto"
    """torch.distributed backend when launched with several workers: auto (nccl when the worker trains on
    CUDA, gloo on the CPU: it follows train.device, not the hardware)."""
    timeout_minutes: float = 60.0
    """How long a collective waits for the slowest rank before the run fails (torch's 10-minute default is
    shorter than a rank converting a dataset or writing a Freebase shard while the others wait)."""
    shared_memory: bool = True
    """CPU (gloo) runs whose workers share a host: move the all-to-alls of entity rows and the all-reduces
    through /dev/shm instead of gloo's TCP loopback (checked at start-up; any other run uses gloo or NCCL
    as they are)."""
    pin_cpus: bool = True
    """When several workers share a host, pin each to an equal, disjoint slice of its CPUs (and, unless
    train.num_threads says otherwise, run that many torch threads). Turn off when other jobs share the host."""


@dataclass(kw_only=True)
class LaunchConfig:
    """What a Ray Train run (``ray-train``, ``submit``, ``make train-freebase``) asks the cluster for."""

    workers: int = 1
    """Ray Train workers (ranks); each owns 1/workers of the entity rows."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker (a fraction shares a core); also each ``tune`` trial's."""
    gpus_per_worker: float = 0.0
    """0: CPU workers over gloo; 1: one GPU per worker, over NCCL (a worker trains on one device: a
    fraction would put two ranks on one GPU, which NCCL refuses)."""
    memory_per_worker_gb: float | None = None
    """Memory each worker needs (the entity shard, its optimiser state, batches); Ray reserves it."""
    max_failures: int = 1
    """Restarts of the worker group from the latest checkpoint before the run fails."""


@dataclass(kw_only=True)
class MetricsConfig:
    port: int | None = None
    """Prometheus endpoint of worker 0; worker r serves port + r. None: no endpoint."""
    host: str = "127.0.0.1"
    """Address the endpoints bind to: loopback unless a scraper on another machine must reach them."""
    run: str | None = None
    """The ``run`` label of every series; None: the run directory's name."""
    discovery_dir: str | None = None
    """Directory where each worker writes a Prometheus file_sd target file (for workers Ray places anywhere)."""
    variance_every: int = 50
    """Steps between updates of the mean entity variance (it reads every local row)."""
    tensorboard: bool = False
    """Also write each epoch's ELBO, KL, NLL, learning rate and validation MRR as TensorBoard scalars to
    RUN/tensorboard/ (worker 0 only)."""


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 512
    """Queries scored per step; with protocol=sampled they share one draw of candidates."""
    max_score_mib: int = 2048
    """protocol=exact: fewer queries per step where [batch, a rank's entities] scores and their masks would
    outgrow this (a Freebase shard of 10.8M rows: 12 queries per step, not 512 and ~90 GB)."""
    num_samples: int = 0
    """0 scores with the posterior means; S > 0 averages the predictive probability over S samples."""
    protocol: EvalProtocol = "exact"
    """The periodic evaluation (train.eval_every): exact ranks each answer against every entity; sampled
    against uniform_candidates + degree_candidates entities drawn per batch, as PyTorch-BigGraph and
    DGL-KE do at 86M entities (docs/evaluation.md). Both report raw and filtered metrics."""
    uniform_candidates: int = 1000
    """protocol=sampled: candidates per batch drawn uniformly over every entity, with replacement."""
    degree_candidates: int = 0
    """protocol=sampled: candidates per batch drawn in proportion to their training frequency. When the two
    counts reach the number of entities, every entity is a candidate and sampled is exact."""
    max_facts: int | None = None
    """The periodic evaluation ranks this seeded sample of valid facts, the same each time (None: all)."""
    final_protocol: EvalProtocol = "exact"
    """The evaluation of the best checkpoint on valid and test at the end of a run and by ``evaluate``."""
    final_max_facts: int | None = None
    """The final evaluation ranks this seeded sample of each split (None: all)."""


@dataclass(frozen=True)
class Interval:
    """The values a numeric field may take: lo..hi, each bound included unless marked open; always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "finite"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE = Interval(0, lo_open=True), Interval(0)
RANGES: dict[str, Interval] = {
    "data.prefetch": NON_NEGATIVE,
    "model.dim": POSITIVE,
    "model.init_logvar": Interval(-30, 10),
    "model.init_std": NON_NEGATIVE,
    "objective.num_negatives": POSITIVE,
    "objective.negative_chunk": POSITIVE,
    "objective.negative_weight": NON_NEGATIVE,
    "objective.adversarial_temperature": NON_NEGATIVE,
    "objective.kl_warmup": Interval(0, 1, hi_open=True),
    "objective.kl_weight": NON_NEGATIVE,
    "objective.reg_weight": NON_NEGATIVE,
    "optim.lr": NON_NEGATIVE,
    "optim.lr_decay": Interval(0, 1, lo_open=True),
    "optim.lr_patience": Interval(1),
    "optim.grad_clip": POSITIVE,
    "optim.clip_sigma_norm": POSITIVE,
    "train.epochs": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.seed": Interval(0, 2**64, hi_open=True),  # it seeds 64-bit generators
    "train.eval_every": NON_NEGATIVE,
    "train.checkpoint_every": POSITIVE,
    "train.time_budget_s": NON_NEGATIVE,
    "train.num_threads": POSITIVE,
    "train.max_rollbacks": NON_NEGATIVE,
    "train.early_stopping_patience": POSITIVE,
    "sharding.block_rows": POSITIVE,
    "sharding.streams": POSITIVE,
    "launch.workers": POSITIVE,
    "launch.cpus_per_worker": POSITIVE,
    "launch.gpus_per_worker": NON_NEGATIVE,
    "sharding.timeout_minutes": POSITIVE,
    "launch.memory_per_worker_gb": POSITIVE,
    "launch.max_failures": Interval(-1),
    "metrics.port": Interval(1, 65535),
    "metrics.variance_every": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.max_score_mib": POSITIVE,
    "eval.num_samples": NON_NEGATIVE,
    "eval.uniform_candidates": NON_NEGATIVE,
    "eval.degree_candidates": NON_NEGATIVE,
    "eval.max_facts": POSITIVE,
    "eval.final_max_facts": POSITIVE,
}
"""The allowed range of every numeric config field, in one place (a test checks that none is missing)."""


@dataclass(kw_only=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        """Reject values no component accepts, naming the key."""
        for field_ in dataclasses.fields(self):
            part = getattr(self, field_.name)
            for name, hint in typing.get_type_hints(type(part)).items():
                _coerce(getattr(part, name), hint, f"{field_.name}.{name}")
        for key, interval in RANGES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{key}={value}: must be a finite number")
            if value is not None and not interval.holds(value):
                raise ValueError(f"{key}={value}: must be {interval}")
        if self.model.scorer == "complex" and self.model.dim % 2:
            raise ValueError(f"model.dim={self.model.dim}: ComplEx needs an even dim (real+imaginary)")
        if self.model.separate_roles and self.objective.reg == "n3":
            raise ValueError("model.separate_roles: objective.reg=n3 weighs one embedding per entity; use reg=none")
        if self.train.early_stopping_patience is not None and not self.train.eval_every:
            raise ValueError("train.early_stopping_patience counts evaluations: it needs train.eval_every > 0")
        patience = self.train.early_stopping_patience
        if patience is not None and self.optim.lr_decay < 1.0 and patience <= self.optim.lr_patience:
            raise ValueError(
                f"train.early_stopping_patience={patience} stops the run before optim.lr_patience="
                f"{self.optim.lr_patience} lets the learning rate decay: make it larger"
            )
        if self.launch.gpus_per_worker not in (0, 1):
            raise ValueError(
                f"launch.gpus_per_worker={self.launch.gpus_per_worker}: a worker trains on one GPU (1) or "
                "none (0); a fraction puts two ranks on one GPU, which NCCL refuses"
            )
        if self.launch.gpus_per_worker and self.train.device == "cpu":
            raise ValueError("launch.gpus_per_worker=1 with train.device=cpu: the GPU would sit idle; use 0")
        if self.sharding.streams and self.train.batch_size % self.sharding.streams:
            raise ValueError("train.batch_size must be a multiple of sharding.streams")
        obj = self.objective
        bernoulli_only = ("exclude_positives", "adversarial_temperature", "split_by_position", "relation_bias")
        for option in bernoulli_only:
            if getattr(obj, option) and obj.likelihood != "bernoulli":
                raise ValueError(
                    f"objective.{option} belongs to the Bernoulli likelihood: "
                    f"it does nothing with objective.likelihood={obj.likelihood}"
                )
        if obj.split_by_position and obj.adversarial_temperature:
            raise ValueError("objective.split_by_position fixes each row's weight: it excludes adversarial_temperature")
        if self.objective.kl_estimator == "per_occurrence" and self.objective.kl_schedule != "uniform":
            raise ValueError("objective.kl_estimator=per_occurrence spreads the KL itself; use kl_schedule=uniform")
        sampled = "sampled" in (self.eval.protocol, self.eval.final_protocol)
        if sampled and self.eval.uniform_candidates + self.eval.degree_candidates == 0:
            raise ValueError("eval.protocol=sampled needs eval.uniform_candidates + eval.degree_candidates > 0")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a dataclass field's type (int widens to float)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return value
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if annotation in (int, float) and isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**64:
        raise ValueError(f"{key}={value}: too large a number")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float, str) and (not isinstance(value, annotation) or isinstance(value, bool)):
        raise ValueError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """A config from the mapping ``to_dict`` wrote (e.g. sent to Ray workers), validated."""
    config = _build(RunConfig, tree, "")
    config.validate()
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} on line {line} is given on line {seen[key]} already", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's contents (``what`` names it in errors: "config file", "search space"); errors name the
    file, and the line where YAML gives one."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte {err.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None


def _override(item: str) -> tuple[str, Any]:
    """A ``--set key=value`` pair, its value parsed as a YAML scalar."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {item!r}: not a YAML value ({err})") from None


def load_config(path: Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML file (optional) plus ``key=value`` overrides, values parsed as YAML scalars. An error names the
    file when the file alone has it, ``--set`` when an override brought it."""
    tree: dict[str, Any] = {}
    source = "config" if path is None else str(path)
    if path is not None:
        tree = read_yaml(path, "config file") or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        try:
            _build(RunConfig, tree, "")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    for item in overrides:
        _set_path(tree, *_override(item))
    if overrides:
        source = f"{source} with --set"
    try:
        config = _build(RunConfig, tree, "")
        config.validate()
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of a config dataclass: the string literal right below the field, read
    from the class's source, where it is written once."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for node, below in zip(body.body, body.body[1:], strict=False):
        doc = below.value.value if isinstance(below, ast.Expr) and isinstance(below.value, ast.Constant) else None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, str):
            docs[node.target.id] = " ".join(doc.split())
    return docs


@dataclass(frozen=True)
class KeyInfo:
    """One config key as ``config --show`` prints it."""

    key: str
    value: Any
    default: Any
    doc: str


def describe(config: RunConfig) -> list[KeyInfo]:
    """Every key of ``config`` (``section.field``) with its value, its default and its docstring."""
    defaults, keys = RunConfig(), []
    for section in dataclasses.fields(RunConfig):
        part = getattr(config, section.name)
        docs = field_docs(type(part))
        for item in dataclasses.fields(part):
            default = getattr(getattr(defaults, section.name), item.name)
            keys.append(
                KeyInfo(f"{section.name}.{item.name}", getattr(part, item.name), default, docs.get(item.name, ""))
            )
    return keys
