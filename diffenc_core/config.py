"""The one typed configuration: loaded from params.yaml, overridden with ``--set a.b=value``.

Every default lives here and is written out in the project's ``params.yaml``; unknown keys,
wrong types and out-of-range values are rejected with a message that names the key.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffenc_core.errors import ConfigError

Fraction = Field(gt=0.0, lt=1.0)


class _Section(BaseModel):
    # every float must be finite: .inf or .nan in a budget, rate or step size fails at step 1, not here
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


NAME_MAX = 255  # bytes in one folder name on common file systems
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(value: str | None) -> str | None:
    """A run name is one folder name directly under ``train.runs_dir``: no path separators, no
    leading dot (``.``, ``..``, hidden folders) or ``~`` (a shell reads it as a home folder), no
    control characters, nothing empty."""
    if value is None:
        return None
    if (not value.strip() or value.startswith((".", "~")) or _UNSAFE_NAME.search(value)
            or len(value.encode()) > NAME_MAX):
        raise ValueError("must be one folder name under train.runs_dir, e.g. 'vae-b0.5' "
                         "(no '/', '\\', '..', leading '.' or '~')")
    return value


def check_folder(value: str | None) -> str | None:
    """A folder or file path: anything but empty or holding a NUL byte."""
    if value is not None and (not value.strip() or "\x00" in value):
        raise ValueError("must be a non-empty path")
    return value


# --------------------------------------------------------------------------------------- data
class BimodalConfig(_Section):
    """``x = (z - c)^2`` read as a complex square, plus Gaussian noise: two posterior modes."""

    shift: tuple[float, float] = (0.4, 0.0)
    noise: float = Field(0.15, gt=0.0)


class LinearGaussianConfig(_Section):
    """Probabilistic PCA ``x = W z + b + noise``; W is drawn so the exact posterior has these stds."""

    x_dim: int = Field(8, ge=1)
    posterior_std: list[float] = Field(default_factory=lambda: [0.09, 0.26], min_length=1)
    noise: float = Field(0.1, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> LinearGaussianConfig:
        if any(not (0.0 < s < 1.0) for s in self.posterior_std):
            raise ValueError("posterior_std entries must lie in (0, 1) (the prior's std is 1)")
        if len(self.posterior_std) > self.x_dim:
            raise ValueError("needs len(posterior_std) <= x_dim")
        return self


class DataConfig(_Section):
    """Which dataset to prepare and how to split it."""

    dataset: Literal["digits", "sprites", "bimodal", "linear_gaussian", "file", "mnist", "fashion_mnist"] = "digits"
    path: str | None = None
    root: str = "data/prepared"
    # mnist / fashion_mnist: torchvision's layout under this folder (<raw_dir>/MNIST/raw/*-ubyte), read
    # offline; download fetches the files there first (needs a network)
    raw_dir: str = "data/raw"
    download: bool = False
    # binary pixels (Burda et al. 2015): dynamic draws a fresh Bernoulli sample of the intensities every
    # time a training batch is drawn, fixed binarises the training set once; validation and test are
    # binarised once with a fixed seed either way
    binarize: Literal["none", "dynamic", "fixed"] = "none"
    seed: int = 0
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    count: int = Field(20000, ge=10)
    image_size: int = Field(32, ge=8, le=256)
    bimodal: BimodalConfig = Field(default_factory=BimodalConfig)
    linear_gaussian: LinearGaussianConfig = Field(default_factory=LinearGaussianConfig)

    _paths = field_validator("root", "path", "raw_dir")(check_folder)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        if self.dataset == "file" and not self.path:
            raise ValueError("dataset 'file' needs data.path (a .parquet, .npz/.npy or PNG folder)")
        return self

    @property
    def name(self) -> str:
        """Folder name under ``root``: the dataset kind (``file`` for the user's own data), the
        same path DVC's ``prepare`` stage declares as its output."""
        return self.dataset

    @property
    def prepared_dir(self) -> Path:
        return Path(self.root) / self.name


# -------------------------------------------------------------------------------------- model
class DecoderConfig(_Section):
    """``p(x|z)``: ``N(f(z), sigma_x^2 I)`` or Bernoulli with logits ``f(z)`` (docs/method.md §1).

    ``kind``: the network (``auto``: conv for images of 32 px and more, else an MLP); ``truth`` uses
    the known decoder of a toy dataset (bimodal, linear_gaussian) and keeps it fixed, so the encoder
    can be checked against the exact posterior. ``likelihood``: ``auto`` is Bernoulli when
    ``data.binarize`` makes the pixels binary, else Gaussian.
    """

    kind: Literal["auto", "mlp", "conv", "truth"] = "auto"
    likelihood: Literal["auto", "gaussian", "bernoulli"] = "auto"
    hidden: int = Field(256, ge=1)
    depth: int = Field(2, ge=1)
    learn_sigma: bool = True
    sigma_init: float = Field(0.1, gt=0.0)
    sigma_min: float = Field(0.01, gt=0.0)


class EncoderConfig(_Section):
    """The conditional epsilon-network of the diffusion encoder (docs/method.md §4)."""

    base: Literal["gaussian", "whitened", "none"] = "whitened"
    # the score network's x-network (auto: conv for images of 32 px and more, else an MLP)
    x_net: Literal["auto", "mlp", "conv"] = "auto"
    hidden: int = Field(128, ge=1)
    blocks: int = Field(2, ge=1)
    time_embed_dim: int = Field(64, ge=2)
    x_embed_dim: int = Field(128, ge=1)
    logsnr_min: float = -8.0
    logsnr_max: float = 12.0
    # what the score net sees besides (z_t, log-SNR, x): `likelihood` adds the log-target's gradient
    # through the decoder at the denoised guess (docs/method.md §4)
    guidance: Literal["none", "likelihood"] = "likelihood"

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.logsnr_min >= self.logsnr_max:
            raise ValueError("logsnr_min must be below logsnr_max")
        return self


class VAEConfig(_Section):
    """The Gaussian encoder of the VAE baseline (and of the diffusion encoder's Gaussian base)."""

    # its trunk (auto: conv for images of 32 px and more, else an MLP)
    kind: Literal["auto", "mlp", "conv"] = "auto"
    hidden: int = Field(256, ge=1)
    depth: int = Field(2, ge=1)


class ModelConfig(_Section):
    latent_dim: int = Field(8, ge=1)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)


# -------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    """Budget, optimisers and bookkeeping shared by both methods."""

    method: Literal["diffusion", "vae"] = "diffusion"
    run: str | None = None
    runs_dir: str = "runs"
    beta: float = Field(1.0, gt=0.0)
    steps: int = Field(2000, ge=1)
    time_budget_s: float = Field(0.0, ge=0.0)
    batch_size: int = Field(128, ge=1)
    lr_encoder: float = Field(2e-3, gt=0.0)
    lr_decoder: float = Field(1e-3, gt=0.0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_final_ratio: float = Field(0.05, gt=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    # the diffusion encoder evaluation samples from: an exponential moving average of its weights (0 = none),
    # its decay ramped as min(ema, (1+n)/(10+n)) over the n EM steps so far
    ema: float = Field(0.999, ge=0.0, lt=1.0)
    seed: int = 0
    threads: int = Field(1, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # data-parallel processes `diffenc train` starts on this machine (torch.distributed; one per core
    # or GPU); inside a torchrun job the job's own world size counts instead
    nproc: int = Field(1, ge=1)
    # seconds a process waits in a collective for the others before the job fails (a hung or lost peer)
    dist_timeout_s: float = Field(600.0, gt=0.0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    val_every: int = Field(500, ge=1)
    # a finished VAE run (a name under runs_dir) whose decoder and encoder seed the diffusion
    # encoder's decoder and Gaussian head; replaces the run's own VAE phase (em.vae_steps)
    warm_start: str | None = None

    _names = field_validator("run", "warm_start")(check_name)
    _folder = field_validator("runs_dir")(check_folder)

    @property
    def run_name(self) -> str:
        """``run``, or the method when unset (``runs/diffusion``, ``runs/vae``: the DVC runs)."""
        return self.run or self.method


# ----------------------------------------------------------------------------------------- em
class SMCConfig(_Section):
    """Tempered sequential Monte Carlo: moves mass between posterior modes."""

    particles: int = Field(8, ge=2)
    temperatures: int = Field(24, ge=2)
    moves: int = Field(2, ge=1)


class EMConfig(_Section):
    """The alternating E-step / encoder / M-step schedule (docs/method.md §3)."""

    e_step: Literal["mala", "ula", "smc"] = "mala"
    # MALA steps per E-step on persistent chains: an example's chain goes on at every visit (§3.1)
    langevin_steps: int = Field(5, ge=0)
    step_size: float = Field(0.01, gt=0.0)
    step_size_max: float = Field(1.0, gt=0.0)
    target_accept: float = Field(0.574, gt=0.0, lt=1.0)
    adapt_rate: float = Field(0.1, ge=0.0)
    alignment: float = Field(0.0, ge=0.0)
    # MALA preconditioned by the Gaussian head's standard deviations (steps in u = (z - mu)/s): a posterior
    # far narrower in some latents than in others (MNIST's inactive units) mixes at one step size
    precondition: bool = True
    persistent: bool = True
    # ancestral steps of the encoder sample that starts a chain (and of the M-step's encoder samples)
    init_sampler_steps: int = Field(2, ge=1)
    # encoder updates per E-step (§3.2); one keeps an EM step a few VAE steps (docs/method.md §9)
    encoder_updates: int = Field(1, ge=1)
    # encoder updates after the first train on (x, z*) pairs drawn from every example's persistent
    # chain (each chain's latest E-step sample), not the same mini-batch again
    replay_chains: bool = True
    decoder_updates: int = Field(1, ge=1)
    warmup_steps: int = Field(20, ge=0)
    warmup_langevin_steps: int = Field(60, ge=0)
    max_retries: int = Field(3, ge=0)
    smc: SMCConfig = Field(default_factory=SMCConfig)
    # the schedule that keeps the decoder encodable (docs/method.md §10): a diffusion run first
    # trains its Gaussian head and decoder as a Gaussian VAE for vae_steps, then train.steps of EM
    # (0 = the paper's EM from scratch; skipped when train.warm_start names a VAE run, and with
    # model.encoder.base none, which has no Gaussian head to train)
    vae_steps: int = Field(2000, ge=0)
    # the M-step's latents: frozen (no decoder update), zstar (the paper's, on the E-step's z*),
    # encoder (the ELBO's decoder gradient, z ~ q_phi(z|x)), head (z from the Gaussian head);
    # auto: zstar from 4 000 training examples up, where the decoder learns without overfitting,
    # else frozen (docs/method.md §11)
    m_step: Literal["auto", "frozen", "zstar", "encoder", "head"] = "auto"
    # the Gaussian head: elbo (the reparameterised ELBO through the decoder, a reverse KL) or nll
    # (fitted to z*, a forward KL); nothing to fit without a head (model.encoder.base none)
    head_loss: Literal["elbo", "nll"] = "elbo"

    @model_validator(mode="after")
    def _check(self) -> EMConfig:
        if self.step_size > self.step_size_max:
            raise ValueError("step_size must not exceed step_size_max")
        return self


# --------------------------------------------------------------------------------------- eval
class EvalConfig(_Section):
    """What an evaluation computes (docs/method.md §8)."""

    checkpoint: Literal["best", "last"] = "best"
    # the amortised encoding (reconstructions, latents, its cost): sampler and steps
    sampler: Literal["dpmpp2m", "ddim", "ancestral"] = "ancestral"
    sampler_steps: int = Field(1, ge=1)
    # the exact log q (ELBO and IWAE) needs a deterministic flow: these steps of it (DPM++, or DDIM
    # when that is the sampler); the path-bound ELBO uses rate_steps of the ancestral sampler
    logq_steps: int = Field(10, ge=1)
    rate_steps: int = Field(100, ge=1)
    refine_steps: int = Field(20, ge=0)
    iwae_k: int = Field(32, ge=1)
    elbo_samples: int = Field(4, ge=1)
    n_recon: int = Field(16, ge=1)
    n_test: int = Field(500, ge=1)
    exact_logq_max_dim: int = Field(64, ge=0)
    batch_size: int = Field(250, ge=1)
    active_unit_threshold: float = Field(0.01, gt=0.0)
    # log p(x) by AIS / tempered SMC from the prior, on the first ais_n test x (0 = skip); a second,
    # shorter ladder on the same x shows how stable the estimate is (docs/method.md §10)
    ais_n: int = Field(200, ge=0)
    ais_temperatures: int = Field(400, ge=2)
    ais_check_temperatures: int = Field(100, ge=0)
    # the check ladder on the first ais_check_n of those x (0 = all): a paired stability figure needs fewer
    ais_check_n: int = Field(0, ge=0)
    ais_particles: int = Field(16, ge=1)
    ais_moves: int = Field(2, ge=1)
    ais_step_size: float = Field(0.05, gt=0.0)
    # draws of the IWAE of encoders with a closed-form Gaussian log q (the VAE, the diffusion encoder's head)
    iwae_k_gaussian: int = Field(1000, ge=0)
    # (x, draw) pairs per importance-sampling pass: bounds the memory of IWAE and exact-log-q ELBO
    iwae_rows: int = Field(1024, ge=1)
    # the importance-sampling bounds (exact-log-q ELBO, IWAE) on the first importance_n test x (0 = all):
    # the diffusion encoder's exact log q costs d backward passes per draw (docs/method.md §8)
    importance_n: int = Field(0, ge=0)
    # AIS below the best bound on the same x is under-converged: the ladder doubles up to this
    ais_max_temperatures: int = Field(1600, ge=0)
    # nats; > 0 also doubles the ladder while the estimate still rose more than this from the shorter one
    ais_ladder_tolerance: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.ais_check_temperatures >= self.ais_temperatures:
            raise ValueError("ais_check_temperatures must be below ais_temperatures (0 skips the check)")
        return self


# --------------------------------------------------------------------------------------- tune
class SearchDim(_Section):
    """One dimension of the Optuna search space, keyed by a dotted config path."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchDim:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty 'choices' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} dimension needs 'low' and 'high'")
            if self.low >= self.high:
                raise ValueError("'low' must be below 'high'")
            if self.log and self.low <= 0:
                raise ValueError("a log-scale dimension needs low > 0")
        return self


def _default_space() -> dict[str, SearchDim]:
    return {
        "em.step_size": SearchDim(type="float", low=1e-4, high=0.1, log=True),
        "em.langevin_steps": SearchDim(type="int", low=5, high=40),
        "em.e_step": SearchDim(type="categorical", choices=["mala", "ula"]),
        "em.target_accept": SearchDim(type="float", low=0.4, high=0.8),
        "em.alignment": SearchDim(type="float", low=1e-3, high=10.0, log=True),
        "train.beta": SearchDim(type="float", low=0.25, high=4.0, log=True),
        "em.encoder_updates": SearchDim(type="int", low=1, high=4),
        "em.persistent": SearchDim(type="categorical", choices=[True, False]),
        "train.lr_encoder": SearchDim(type="float", low=1e-4, high=3e-3, log=True),
        "train.lr_decoder": SearchDim(type="float", low=1e-4, high=3e-3, log=True),
    }


class TuneConfig(_Section):
    """An Optuna study over ``space`` (dotted config keys), resumable by re-running it."""

    study: str = "diffenc"
    storage: str | None = None
    n_trials: int = Field(20, ge=1)
    workers: int = Field(1, ge=1)
    objective: Literal["neg_elbo", "distortion", "rate_distortion"] = "neg_elbo"
    trial_steps: int = Field(300, ge=1)
    report_every: int = Field(100, ge=1)
    pruner: Literal["median", "none"] = "median"
    sampler_seed: int = 0
    heartbeat_interval: int = Field(5, ge=1)
    grace_period: int = Field(15, ge=1)
    max_retry: int = Field(2, ge=0)
    space: dict[str, SearchDim] = Field(default_factory=_default_space)


# --------------------------------------------------------------------------------------- root
class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    em: EMConfig = Field(default_factory=EMConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _check_schedule(self) -> Config:
        if self.train.method != "diffusion" or self.model.encoder.base != "none":
            return self
        uses_head = {
            "train.warm_start": self.train.warm_start is not None,
            "em.m_step 'head'": self.em.m_step == "head",
        }
        if any(uses_head.values()):
            used = ", ".join(k for k, v in uses_head.items() if v)
            raise ValueError(
                f"model.encoder.base 'none' has no Gaussian head, which {used} needs: "
                "use base 'whitened' or 'gaussian'"
            )
        return self

    @property
    def vae_phase_steps(self) -> int:
        """Steps of a diffusion run's own VAE phase: none for the VAE, from a VAE run
        (``train.warm_start``), or without a Gaussian head to train (``model.encoder.base: none``)."""
        if self.train.method != "diffusion" or self.train.warm_start is not None:
            return 0
        return 0 if self.model.encoder.base == "none" else self.em.vae_steps

    @property
    def likelihood(self) -> Literal["gaussian", "bernoulli"]:
        """The decoder's likelihood: ``model.decoder.likelihood``, or for ``auto`` Bernoulli exactly when
        ``data.binarize`` makes the pixels binary."""
        chosen = self.model.decoder.likelihood
        if chosen != "auto":
            return chosen
        return "gaussian" if self.data.binarize == "none" else "bernoulli"

    @property
    def total_steps(self) -> int:
        """Every step a run takes: its VAE phase, then ``train.steps`` of its own method."""
        return self.vae_phase_steps + self.train.steps

    @model_validator(mode="after")
    def _check_space(self) -> Config:
        for key in self.tune.space:
            try:
                lookup(self.model_dump(), key)
            except (KeyError, ConfigError):
                raise ValueError(f"tune.space key '{key}' is not a configuration key") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- keys that leave results unchanged
RESULT_NEUTRAL = (
    "train.run", "train.runs_dir", "data.root",  # where the run and the prepared data live
    "train.threads", "train.device", "train.nproc", "train.dist_timeout_s",  # where and how it computes
    "train.checkpoint_every", "train.log_every",  # how often it writes
    "eval.",  # what an evaluation computes: training never reads it
)
"""Keys whose value leaves what a training computes unchanged (``train.nproc`` changes which random
streams are drawn, not the method); an entry ending in '.' is a whole section. Both lists below start here."""

TRIAL_KEYS = ("train.run", "train.runs_dir", "train.steps", "train.val_every")
"""What each tuning trial sets itself: its run folder, its budget (``tune.trial_steps``) and validation interval."""

RESUME_FREE = (*RESULT_NEUTRAL, "train.steps", "train.time_budget_s", "tune.")
"""May differ between a run and its ``--resume``: the neutral keys, the budget (a resume may extend it)
and ``tune.*`` (a training never reads it)."""

STUDY_FREE = (*RESULT_NEUTRAL, *TRIAL_KEYS, "tune.study", "tune.storage", "tune.n_trials", "tune.workers",
              "tune.heartbeat_interval", "tune.grace_period", "tune.max_retry")
"""May differ between two starts of one study: the neutral keys, what each trial sets itself, and how this
start runs the study. Unlike a resume, not ``train.time_budget_s`` (it caps every trial) nor the ``tune``
keys that define the study (objective, space, trial_steps, report_every, pruner, sampler_seed)."""


def is_free(key: str, free: tuple[str, ...]) -> bool:
    """Whether the dotted ``key`` (a leaf of :func:`flatten`) is one of ``free`` or lies in a section of it."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in free)


# ------------------------------------------------------------------------------ dotted keys
# The one reading of dotted keys (``--set``, Prefect parameters, resume and study checks). A key walks the
# configuration's sections; ``tune.space`` is a mapping keyed by dotted configuration keys, so inside it the
# longest prefix that names a configuration key is one node: tune.space.em.step_size.low is
# ["tune", "space", "em.step_size", "low"].
@dataclass(frozen=True)
class _Mapping:
    """A field that maps keys of its own (not fields) to values of ``value`` (a model, or None: plain values)."""

    value: type[BaseModel] | None


Node = type[BaseModel] | _Mapping | None  # what a tree node holds: a section, a mapping, or a value / unknown


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _inner(node: Node, name: str) -> Node:
    """The kind of node found under ``name`` in a node of kind ``node``."""
    if isinstance(node, _Mapping):
        return node.value
    field = node.model_fields.get(name) if node is not None else None
    if field is None:
        return None
    if typing.get_origin(field.annotation) is dict:
        return _Mapping(_model(typing.get_args(field.annotation)[1]))
    return _model(field.annotation)


@functools.cache
def leaf_keys() -> frozenset[str]:
    """Every dotted key of a value (not a section) in the configuration."""
    return frozenset(k for k, ann in _fields(Config) if _model(ann) is None)


def _annotation(key: str) -> Any:
    """The type of the value at the dotted ``key`` (None for an unknown key)."""
    try:
        nodes = split_key(key)
    except ConfigError:
        return None
    kind: Node = Config
    for name in nodes[:-1]:
        kind = _inner(kind, name)
    if isinstance(kind, _Mapping):
        return kind.value
    field = kind.model_fields.get(nodes[-1]) if kind is not None else None
    return field.annotation if field is not None else None


def split_key(key: str, where: str | None = None, node: Node = None) -> list[str]:
    """The nodes of a dotted ``key`` below a node of kind ``node`` (default: the whole configuration)."""
    parts = str(key).split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"{where or key}: bad key {str(key)!r} (expected dotted names, e.g. 'train.beta')")
    node = Config if node is None else node
    out: list[str] = []
    i = 0
    while i < len(parts):
        if isinstance(node, _Mapping):
            known = leaf_keys()
            end = next((j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in known), len(parts))
            out.append(".".join(parts[i:end]))
            i = end
        else:
            out.append(parts[i])
            i += 1
        node = _inner(node, out[-1])
    return out


def lookup(tree: dict[str, Any], key: str) -> Any:
    """The value at the dotted ``key`` of a nested ``tree``; KeyError when it is not there."""
    node: Any = tree
    for part in split_key(key):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_dotted(tree: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Set the dotted ``key`` of the nested ``tree`` to ``value``. A mapping given for a configuration
    section is merged into it key by key (its keys dotted or nested alike); anything else replaces what
    was there (values, lists, the ``tune.space`` mapping)."""
    _set(tree, split_key(key, where), value, where or key, Config)


def _set(tree: dict[str, Any], nodes: list[str], value: Any, where: str, kind: Node) -> None:
    node = tree
    for i, name in enumerate(nodes):
        parent, kind = kind, _inner(kind, name)
        if i == len(nodes) - 1:
            break
        if kind is None and _model(parent) is not None and name in parent.model_fields:
            raise ConfigError(f"{where}: '{'.'.join(nodes[: i + 1])}' is a value, not a section")
        nxt = node.setdefault(name, {})
        if nxt is None:
            nxt = node[name] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: '{'.'.join(nodes[: i + 1])}' is a value, not a section")
        node = nxt
    last, section = nodes[-1], _model(kind)
    if section is not None and value is not None and not isinstance(value, dict):
        name = ".".join(nodes)
        raise ConfigError(f"{where}: '{name}' is a section: set its keys (e.g. {name}."
                          f"{next(iter(section.model_fields))}), not the section itself (got {_short(value)})")
    if section is not None:  # merged key by key (an empty section in a file changes nothing)
        if not isinstance(node.get(last), dict):
            node[last] = {}
        for sub, sub_value in (value or {}).items():
            _set(node[last], split_key(sub, where, kind), sub_value, where, kind)
        return
    node[last] = value


def flatten(tree: dict[str, Any], node: Node = None, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; a mapping's entries are leaves of their own (``tune.space['em.step_size']``)."""
    node = Config if node is None and not prefix else node
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full, inner = f"{prefix}{key}", _inner(node, str(key))
        if isinstance(inner, _Mapping) and isinstance(value, dict):
            out |= {f"{full}['{k}']": v for k, v in value.items()}
        elif isinstance(value, dict) and value and (inner is not None or node is None or _model(node) is None):
            out |= flatten(value, inner, full + ".")
        else:
            out[full] = value
    return out


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) of every field, sections and their fields alike."""
    out = []
    for name, field in model.model_fields.items():
        out.append((f"{prefix}{name}", field.annotation))
        sub = _model(field.annotation)
        if sub is not None:
            out += _fields(sub, f"{prefix}{name}.")
    return out


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [k for k, _ in _fields(model)]


def _accepts_text(key: str) -> bool:
    """Whether the value at ``key`` is text (a name, path or choice): a ``--set`` gives it verbatim."""
    ann = _annotation(key)
    options = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    for option in options:
        if option is str:
            return True
        if typing.get_origin(option) is Literal and all(isinstance(a, str) for a in typing.get_args(option)):
            return True
    return False


# ------------------------------------------------------------------------------ validation
Layer = tuple[str, dict[str, Any]]
"""Overrides and how an error in them is attributed: ``("--set {key}", {...})`` names each key's own
``--set``; a label without ``{key}`` (``"parameters"``) is followed by the key."""


SHOWN_INPUT = 80  # characters of a rejected value shown in its message


def _owner(key: str, message: str, layers: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The (dotted key, label) of the override behind an error at ``key`` (the last one counts): the key
    itself or a section it lies in; else, for a check of a whole section (or of the whole configuration,
    ``key`` empty), an override inside it that the message names; for an unknown section, the key set in it."""
    direct = [o for o in layers if key and (key == o[0] or key.startswith(o[0] + "."))]
    if direct:
        return direct[-1]
    inside = [o for o in layers if not key or o[0].startswith(key + ".")]
    named = [o for o in inside if o[0] in message] or [o for o in inside if split_key(o[0])[-1] in message]
    if named:
        return named[-1]
    return inside[-1] if inside and not message else None


def _format_error(err: ValidationError, source: str, layers: list[tuple[str, str]]) -> str:
    """One line: every problem, separated by '; ', each naming where the bad value came from (the
    ``--set`` or parameter that gave it, else ``source``, the params file) and the key."""
    problems: list[str] = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if p != "__root__")
        unknown = e["type"] == "extra_forbidden"
        msg = e["msg"].removeprefix("Value error, ")
        owner = _owner(key, "" if unknown else msg, layers)
        where = source if owner is None else owner[1].format(key=owner[0])
        if unknown:
            unknown_key = owner[0] if owner is not None and len(owner[0]) > len(key) else key
            close = difflib.get_close_matches(unknown_key, _known_keys(Config), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            text = f"{where}: unknown key '{unknown_key}'{hint}"
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_short(got)})"
            named = "" if not key or (owner is not None and key == owner[0] and "{key}" in owner[1]) else f"{key}: "
            text = f"{where}: {named}{msg}{shown}"
        if text not in problems:
            problems.append(text)
    return "; ".join(problems)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_INPUT else text[: SHOWN_INPUT - 1] + "…"


def resolve(params: str | Path | None = None, *layers: Layer, tree: dict[str, Any] | None = None) -> Config:
    """The params file (None: the defaults; or a ready ``tree``), then each layer of dotted overrides in
    turn, validated once; a bad key or value is one ConfigError line naming the file or override."""
    base = copy.deepcopy(tree) if tree is not None else Config().to_dict()  # a dotted key edits a default too
    if params is not None:
        for key, value in read_yaml(params).items():
            set_dotted(base, key, value, str(params))
    owners: list[tuple[str, str]] = []
    for label, overrides in layers:
        for key, value in overrides.items():
            where = label.format(key=key) if "{key}" in label else f"{label}: {key}"
            set_dotted(base, key, value, where)
            owners.append((str(key), label))
    return from_dict(base, str(params) if params is not None else "config", owners)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.beta=0.5", ...]`` -> ``{"train.beta": 0.5}``: values are read as YAML, except for
    text keys (names, paths, choices), which take the text as written (``train.run=~`` is the name '~')."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.beta=0.5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        if _accepts_text(key) or not raw.strip():
            out[key] = raw
            continue
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


def from_dict(tree: dict[str, Any], source: str = "config", owners: list[tuple[str, str]] | None = None) -> Config:
    """Validate a nested dict; a bad key or value raises one ConfigError line naming it (and the override
    that gave it, ``owners``: (dotted key, label) pairs as :func:`resolve` makes them)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, owners or [])) from None


ZSTAR_FROM_N_TRAIN = 4_000  # em.m_step auto: lost on 1 437 digits, won on 4 000, 9 600 and 55 000 images (§11)


def resolve_m_step(m_step: str, n_train: int) -> str:
    """``em.m_step`` for a training set of ``n_train``: ``auto`` is the paper's ``zstar`` where the decoder learns
    without overfitting (``ZSTAR_FROM_N_TRAIN`` examples and up), else ``frozen`` (docs/method.md §11)."""
    if m_step != "auto":
        return m_step
    return "zstar" if n_train >= ZSTAR_FROM_N_TRAIN else "frozen"


BEFORE_THEY_EXISTED = {("model", "encoder", "guidance"): "none"}
"""Settings added since runs and studies began storing theirs, with what the code did before them."""


def from_stored(tree: dict[str, Any], source: str = "config") -> Config:
    """A run's or study's stored settings: a key it predates means what the code did then, not today's default
    (a run trained before ``model.encoder.guidance`` existed has an unguided score net)."""
    tree = copy.deepcopy(tree)
    for path, value in BEFORE_THEY_EXISTED.items():
        node = tree
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] not in node:
            node[path[-1]] = value
    return from_dict(tree, source)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a params file: a YAML mapping in UTF-8; anything else is one ConfigError line naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a params file (give a .yaml file, e.g. --params params.yaml)")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: params file not found") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the params file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                          "save the params file as UTF-8") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML{_yaml_where(err)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level (data:, model:, train:, ...), "
                          f"not a {type(tree).__name__}")
    return tree


def _yaml_where(err: yaml.YAMLError) -> str:
    """`` at line L, column C: problem`` from a YAML error (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "reason", None) or err.__class__.__name__
    if mark is not None:
        context = getattr(err, "context", None)
        more = f" ({context})" if context else ""
        return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{more}"
    position, character = getattr(err, "position", None), getattr(err, "character", None)
    what = f"character #x{character:04x}, " if isinstance(character, int) else ""
    return f" at offset {position}: {what}{problem}" if position is not None else f": {problem}"


def load(
    params: str | Path | None = "params.yaml",
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Load ``params`` (None = all defaults) and apply dotted overrides (``--set`` strings or a dict) on top."""
    sets = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return resolve(params, ("--set {key}", sets))


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted overrides applied and validated: a new configuration derived from one."""
    return resolve(None, ("--set {key}", overrides), tree=cfg.to_dict())


class _Dumper(yaml.SafeDumper):
    """Writes null as an empty value (``path:``), exactly as ``dvc exp run -S`` rewrites params.yaml,
    so a DVC round trip leaves the file unchanged; every YAML reader reads it back as null."""


_Dumper.add_representer(type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", ""))


def to_yaml(tree: dict[str, Any]) -> str:
    """A params tree as YAML in the layout DVC keeps (key order as given, nulls empty)."""
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False)


def dump(cfg: Config, path: str | Path | None = None) -> str:
    """The fully resolved configuration as YAML (written to ``path`` if given, atomically)."""
    text = to_yaml(cfg.to_dict())
    if path is not None:
        from diffenc_core.runs import atomic_write_text

        atomic_write_text(Path(path), text)
    return text
