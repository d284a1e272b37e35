"""The experiment config: one YAML schema, validated (with errors that name the field) before anything starts.

A config is a YAML mapping of sections (``task``, ``swarm``, ``search_space``, ``budget``, ...); every key has a
default, unknown keys are errors, and types are strict (``max_steps: "40"`` or ``max_steps: true`` is refused,
not coerced). ``load_config`` reads a file, applies ``--set dotted.key=value`` overrides and returns an
``ExperimentConfig`` whose paths are absolute, so trials that run in another working directory (Ray gives
each trial its own) find the same model, data and MLflow database::

    config = load_config("experiments/smollm2_bbc_news.yaml", ["budget.max_steps=5"])
    config.output_dir      # PosixPath('/abs/runs/smollm2_bbc_news')
    config.tracking_uri    # 'sqlite:////abs/runs/smollm2_bbc_news/mlflow.db'

Every problem is reported at once, one per line, as ``<dotted.path>: <value> is not allowed: <rule>``.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ptune_search.config_errors import MAX_SHOWN, ConfigError, RuleBroken, describe_error, show_value
from ptune_search.models.ptune import TUNING_MODES, TuningMode
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.replica_layout import replica_layout_problem

Name = Annotated[StrictStr, Field(min_length=1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


class _Section(BaseModel):
    # A docstring under a field is its description: docs/search.md's config reference is generated from them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)


class TaskConfig(_Section):
    """Which classification task to tune on, and how much of it."""

    name: Name = "bbc_news"
    """A packaged task (bbc_news, clothing_reviews) or the path of a .csv or .jsonl file."""
    text_column: Name = "text"
    """The column holding the input text."""
    label_column: Name = "label"
    """The column holding the class name."""
    max_length: Annotated[StrictInt, Field(ge=8)] = 64
    """Tokens of input text kept (the text is cut, never the template)."""
    train_size: Optional[PositiveInt] = None
    """Training examples (null: every example not used for validation or test)."""
    validation_size: Optional[PositiveInt] = None
    """Validation examples, which choose the best trial (null: 20% of the examples)."""
    test_size: Optional[Annotated[StrictInt, Field(ge=0)]] = None
    """Held out from training and selection; the best prompt and the baseline are evaluated on it once, after
    the search (null: 20% of the examples; 0: no test split)."""
    skip_invalid_rows: StrictBool = False
    """Drop rows with an empty text or label (with a warning) instead of refusing the file."""
    label_words: dict[Name, Name] = Field(default_factory=dict)
    """The word the LM head scores for each class when search_space.heads has label_words: class name -> word
    (its first token counts). Classes not named here use " <class name>"."""

    @field_validator("name")
    @classmethod
    def _packaged_or_table(cls, name: str, info: ValidationInfo) -> str:
        from ptune_search.data import PACKAGED_TASKS, TABLE_EXTENSIONS  # lazily: data.py imports torch

        if name in PACKAGED_TASKS:
            return name
        if not name.endswith(TABLE_EXTENSIONS):
            raise ValueError(
                f"must be a packaged task ({', '.join(PACKAGED_TASKS)}) or the path of a "
                f"{' or '.join(TABLE_EXTENSIONS)} file"
            )
        path = _absolute(name, info)
        if _checks_paths(info) and not path.is_file():
            raise RuleBroken((), f"{name} does not exist; give an existing {' or '.join(TABLE_EXTENSIONS)} file")
        return str(path)

    @model_validator(mode="after")
    def _columns_differ(self) -> TaskConfig:
        if self.label_column == self.text_column:
            raise RuleBroken(
                ("label_column",),
                f"{show_value(self.label_column)} is not allowed: must differ from {{section}}text_column",
            )
        return self


class SwarmConfig(_Section):
    """The block servers trials share: started by the search as processes on the driver's machine (local) or as
    Ray actors on the cluster nodes with the ``swarm_host`` resource (ray), or already running (external)."""

    mode: Literal["local", "ray", "external"] = "local"
    """local: servers on the driver's machine; ray: servers as Ray actors on swarm_host nodes; external: join
    a running swarm."""
    servers: PositiveInt = 2
    """Block servers to start (local and ray); each serves an equal span of the blocks."""
    replicas: PositiveInt = 1
    """Servers per span (local and ray); servers must be a multiple of it."""
    initial_peers: list[StrictStr] = Field(default_factory=list)
    """Multiaddrs of the swarm to join (external only)."""
    request_timeout: Annotated[float, Field(gt=0)] = ClientConfig.request_timeout
    """Seconds a server may take to answer before the request goes to another replica and the server is
    banned."""
    block_wait_timeout: Annotated[float, Field(gt=0)] = ClientConfig.block_wait_timeout
    """Seconds a block may have no online server before the trial fails, to be retried from its checkpoint
    (budget.max_failures times)."""
    trusted_servers: Optional[list[StrictStr]] = ClientConfig.trusted_servers
    """Peer ids of the only servers trials use (external only; servers keep theirs with --identity-file)."""

    @field_validator("trusted_servers")
    @classmethod
    def _peer_ids(cls, peers: Optional[list[str]]) -> Optional[list[str]]:
        for index, peer in enumerate(peers or []):
            problem = _peer_id_problem(peer)
            if problem is not None:
                raise RuleBroken(
                    (index,), f"{show_value(peer)} is not allowed: must be a peer id like Qm... ({problem})"
                )
        return peers

    @field_validator("initial_peers")
    @classmethod
    def _multiaddrs(cls, peers: list[str]) -> list[str]:
        for index, peer in enumerate(peers):
            problem = _multiaddr_problem(peer)
            if problem is not None:
                raise RuleBroken(
                    (index,),
                    f"{show_value(peer)} is not allowed: must be a multiaddr like /ip4/10.0.0.5/tcp/31337/p2p/Qm... "
                    f"({problem})",
                )
        return peers

    @model_validator(mode="after")
    def _servers_fill_replicas(self) -> SwarmConfig:
        problem = replica_layout_problem(self.servers, self.replicas)
        if self.mode != "external" and problem:
            # Names both fields: a user who changed either one reads what to change back.
            raise RuleBroken(
                ("servers",), f"{self.servers} is not allowed with {{section}}replicas={self.replicas}: {problem}"
            )
        return self

    @model_validator(mode="after")
    def _peers_match_mode(self) -> SwarmConfig:
        if self.mode == "external" and not self.initial_peers:
            raise RuleBroken(
                ("initial_peers",),
                "[] is not allowed: {section}mode 'external' needs at least one peer multiaddr to join",
            )
        if self.mode in ("local", "ray") and self.trusted_servers is not None:
            raise RuleBroken(
                ("trusted_servers",),
                f"{show_value(self.trusted_servers)} is not allowed when {{section}}mode is '{self.mode}': the search "
                "starts its own servers, with new peer ids; set {section}mode to 'external' to trust given servers",
            )
        if self.mode in ("local", "ray") and self.initial_peers:
            raise RuleBroken(
                ("initial_peers",),
                f"{show_value(self.initial_peers)} is not allowed: must be empty when {{section}}mode is '{self.mode}' "
                "(the search starts its own swarm); set {section}mode to 'external' to join these peers",
            )
        return self


class IntRange(_Section):
    """An integer interval sampled uniformly."""

    low: PositiveInt
    high: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        _check_ordered(self.low, self.high)
        return self


class LogRange(_Section):
    """A positive float interval sampled on a log scale."""

    low: Annotated[float, Field(gt=0)]
    high: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        _check_ordered(self.low, self.high)
        return self


class SearchSpace(_Section):
    """What Optuna chooses for each trial."""

    tuning_modes: Annotated[list[TuningMode], Field(min_length=1)] = Field(default_factory=lambda: list(TUNING_MODES))
    """ptune (prompts before the input embeddings) and/or deep_ptune (a prompt added to every block's input)."""
    pre_seq_len: IntRange = Field(default_factory=lambda: IntRange(low=4, high=32))
    """Prompt length in tokens, sampled uniformly."""
    lr: LogRange = Field(default_factory=lambda: LogRange(low=1.0e-4, high=3.0e-2))
    """The prompts' learning rate, sampled on a log scale."""
    head_lr: LogRange = Field(default_factory=lambda: LogRange(low=5.0e-3, high=5.0e-2))
    """The learning rates the head-only sweeps try (budget.baseline_lrs of them, log-spaced): the baseline's,
    and the one that fits the trials' starting head; a trial's head then trains at a fifth of the rate chosen."""
    prompt_init: Annotated[list[StrictStr], Field(min_length=1)] = Field(default_factory=lambda: ["labels"])
    """Where prompts start: random, vocab, labels or text:<words>; several values make it a searched choice."""
    template: StrictStr = "{text}"
    """The hand-written prompt around every trial's input ({text} is the input). The head-only baseline reads
    the bare text: it is the search without any prompt."""
    heads: Annotated[list[Literal["linear", "label_words"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["linear"]
    )
    """Where a trial's head starts: linear, the best head of a head-only sweep on the trials' inputs;
    label_words, the LM head's rows of the classes' label words (task.label_words). Several values make it a
    searched choice."""

    @field_validator("template")
    @classmethod
    def _one_text_slot(cls, template: str) -> str:
        from ptune_search.data import check_template  # lazily: data.py imports torch

        try:
            return check_template(template)
        except ValueError as error:
            raise RuleBroken((), f"{show_value(template)} is not allowed: {error}") from None

    @field_validator("prompt_init")
    @classmethod
    def _known_inits(cls, inits: list[str]) -> list[str]:
        from ptune_search.models.prompt_init import check_prompt_init  # lazily: it imports torch

        for index, init in enumerate(inits):
            try:
                check_prompt_init(init)
            except ValueError as error:
                raise RuleBroken((index,), f"{show_value(init)} is not allowed: {error}") from None
            if inits.index(init) < index:
                raise RuleBroken((index,), f"{show_value(init)} is not allowed: repeats {{section}}prompt_init")
        return inits

    @model_validator(mode="after")
    def _modes_unique(self) -> SearchSpace:
        for index, mode in enumerate(self.tuning_modes):
            first = self.tuning_modes.index(mode)
            if first < index:
                raise RuleBroken(
                    ("tuning_modes", index),
                    f"{show_value(mode)} is not allowed: repeats {{section}}tuning_modes[{first}]",
                )
        return self


class Budget(_Section):
    """How many trials, how long each trains, and how often it is evaluated (and may be stopped)."""

    num_samples: PositiveInt = 6
    """Trials Optuna proposes."""
    max_steps: PositiveInt = 40
    """Training steps of a trial that ASHA does not stop (and of the head-only sweeps)."""
    eval_every: PositiveInt = 10
    """Steps between evaluations on validation; ASHA decides at its rungs among them."""
    batch_size: PositiveInt = 8
    """Training examples per step."""
    max_concurrent_trials: PositiveInt = 2
    """Trials training at once."""
    max_failures: Annotated[StrictInt, Field(ge=0)] = 2
    """Restarts of a failed trial from its last checkpoint."""
    rung_validation_size: Optional[PositiveInt] = 50
    """Evaluations before a trial's last (ASHA's rungs) read this many validation examples (a fixed,
    stratified subset; null: all); the last one reads the whole split."""
    eval_batch_size: PositiveInt = 32
    """Examples per forward-only evaluation batch."""
    baseline_lrs: PositiveInt = 4
    """Learning rates each head-only sweep tries, log-spaced over search_space.head_lr, on the same features;
    it keeps the best on validation."""

    @model_validator(mode="after")
    def _eval_within_training(self) -> Budget:
        if self.eval_every > self.max_steps:
            raise RuleBroken(
                ("eval_every",),
                f"{self.eval_every} is not allowed: must be <= {{section}}max_steps ({self.max_steps})",
            )
        return self


class SamplerConfig(_Section):
    """How Optuna proposes trials: ``tpe`` (multivariate, with a constant liar for trials running at the same
    time), ``gp`` (Gaussian process) or ``random``. The first ``n_startup_trials`` proposals are random
    (None: a third of budget.num_samples, at least 2); the model proposes the rest."""

    sampler: Literal["tpe", "gp", "random"] = "tpe"
    """tpe (multivariate, constant liar), gp (Gaussian process) or random."""
    n_startup_trials: Optional[PositiveInt] = None
    """Random proposals before the model proposes (null: a third of budget.num_samples, at least 2)."""

    def startup_trials(self, num_samples: int) -> int:
        return self.n_startup_trials if self.n_startup_trials is not None else max(2, num_samples // 3)


class SchedulerConfig(_Section):
    """ASHA: a trial runs at least ``grace_period`` steps; each rung keeps 1/``reduction_factor`` of the trials."""

    grace_period: PositiveInt = 10
    """Steps every trial runs before ASHA may stop it (its first rung)."""
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    """Each rung keeps 1/reduction_factor of the trials; rungs sit at grace_period times its powers."""


class ResourcesConfig(_Section):
    """What Ray reserves for each trial actor."""

    cpu: Annotated[float, Field(ge=0.0001)] = 1
    """CPUs Ray reserves for each trial actor (its torch threads); Ray refuses finer fractions."""


class MLflowConfig(_Section):
    """Where trials are recorded; ``tracking_uri`` is absolute once the config is loaded."""

    tracking_uri: Optional[Name] = None
    """The MLflow store (null: sqlite:///<output_dir>/mlflow.db)."""
    experiment_name: Name = "ptune-search"
    """The MLflow experiment of the search's runs."""
    registered_model_name: Optional[Name] = None
    """The Model Registry name of the best prompt's pyfunc model (null: the experiment's name)."""
    flush_timeout_s: Annotated[float, Field(gt=0)] = 300
    """Seconds the end of a search waits for an unreachable store; then it exits non-zero and keeps the
    records for --resume."""


class ExperimentConfig(_Section):
    """A whole search: model, task, swarm, search space, budget and where results go (see module docstring)."""

    model: Annotated[StrictStr, Field(min_length=1, validate_default=True)] = "smollm2-135m"
    """A packaged or generated model alias (see ptune-search prepare-model) or a Hugging Face checkpoint
    folder."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    budget: Budget = Field(default_factory=Budget)
    search: SamplerConfig = Field(default_factory=SamplerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    baseline: StrictBool = True
    """Also run the head-only baseline (the bare text, no prompt, the same steps) and test it."""
    seed: Annotated[StrictInt, Field(ge=0, lt=2**32)] = 0
    """One seed, one search: proposals, data order, ASHA's decisions and the figures."""
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    output_dir: Annotated[Path, Field(strict=False, validate_default=True)] = Path("runs/default")
    """Where the MLflow store, the Optuna study, Tune's state, trials.csv and the plots go."""

    @field_validator("model")
    @classmethod
    def _alias_or_checkpoint(cls, model: str, info: ValidationInfo) -> str:
        from ptune_search.pretrained import GENERATED_MODELS, MODEL_ALIASES, PACKAGED_MODELS, packaged_gguf

        if model in GENERATED_MODELS:
            return model
        if model in PACKAGED_MODELS:
            if _checks_paths(info):
                try:
                    packaged_gguf(model)
                except FileNotFoundError as error:
                    raise RuleBroken((), f"{model} is not usable: {error}") from None
            return model
        path = _absolute(model, info)
        if _checks_paths(info) and not (path / "config.json").is_file():
            problem = "is a folder without config.json" if path.is_dir() else "does not exist"
            raise RuleBroken(
                (),
                f"{model} {problem}; use a model alias ({', '.join(MODEL_ALIASES)}) "
                "or a Hugging Face checkpoint folder",
            )
        if _checks_paths(info):
            from ptune_search.models.registry import UnsupportedModelError, check_supported

            try:
                check_supported(path)
            except (UnsupportedModelError, ValueError) as error:
                raise RuleBroken((), str(error)) from None
        return str(path)

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_given(cls, output_dir: Any) -> Any:
        if isinstance(output_dir, str) and not output_dir.strip():
            raise ValueError("must not be empty; write . for the working directory")
        return output_dir

    @field_validator("output_dir")
    @classmethod
    def _absolute_output_dir(cls, output_dir: Path, info: ValidationInfo) -> Path:
        return _absolute(output_dir, info)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> ExperimentConfig:
        if self.scheduler.grace_period > self.budget.max_steps:
            raise RuleBroken(
                ("scheduler", "grace_period"),
                f"{self.scheduler.grace_period} is not allowed: must be <= budget.max_steps ({self.budget.max_steps})",
            )
        self.mlflow.tracking_uri = _resolve_tracking_uri(self.mlflow.tracking_uri, self.output_dir, info)
        return self

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_model_name or self.mlflow.experiment_name

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI, absolute (relative ones break inside Ray trials, which change directory)."""
        assert self.mlflow.tracking_uri is not None  # set by _resolve
        return self.mlflow.tracking_uri

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for logging the resolved config to MLflow."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable again with ``load_config``."""
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False)


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_paths: bool = True) -> ExperimentConfig:
    """Read a YAML config, apply ``dotted.key=value`` overrides and validate; relative paths are taken from the cwd.

    ``check_paths=False`` skips the existence checks of the model and task files (not their validation).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file: {error}") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: {show_value(data)} is not allowed: the config must be a mapping of sections "
            f"({', '.join(ExperimentConfig.model_fields)})"
        )
    for override in overrides:
        _apply_override(data, override)
    return parse_config(data, check_paths=check_paths)


def parse_config(
    data: Mapping[str, Any], base_dir: str | Path | None = None, *, check_paths: bool = True
) -> ExperimentConfig:
    """Validate a config mapping; relative paths are taken from ``base_dir`` (default: the cwd)."""
    context = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd(), "check_paths": check_paths}
    try:
        return ExperimentConfig.model_validate(data, context=context)
    except ValidationError as error:
        raise ConfigError([describe_error(detail, ExperimentConfig) for detail in error.errors()]) from None


def parse_override(override: str) -> tuple[list[str], Any]:
    """``'budget.max_steps=5'`` -> (['budget', 'max_steps'], 5); the value is read as YAML."""
    key, sep, text = override.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override {override!r} is not allowed: must be dotted.key=value, e.g. budget.max_steps=5")
    try:
        value = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{key.strip()}: override value {text!r} is not valid YAML: {_yaml_problem(error)}") from None
    return keys, value


def _apply_override(data: dict[str, Any], override: str) -> None:
    keys, value = parse_override(override)
    section = data
    for depth, key in enumerate(keys[:-1]):
        section = section.setdefault(key, {})
        if not isinstance(section, dict):
            parent = ".".join(keys[: depth + 1])
            raise ConfigError(f"{'.'.join(keys)}: cannot set: {parent} is {show_value(section)}, not a mapping")
    section[keys[-1]] = value


class _ConfigLoader(yaml.SafeLoader):
    """YAML with two traps removed: duplicate keys are errors, and ``1e-3`` is a float (YAML 1.1 reads a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _ConfigDumper(yaml.SafeDumper):
    """Writes what ``_ConfigLoader`` reads back unchanged: a string such as ``0E0`` is quoted."""


for _yaml_class in (_ConfigLoader, _ConfigDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's '<unicode string>' noise."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        what = " ".join(part for part in (error.context, error.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(error).split())


def _multiaddr_problem(peer: str) -> Optional[str]:
    """Why a swarm client could not dial ``peer`` (hivemind parses it the same way), or None."""
    from hivemind.utils.multiaddr import Multiaddr  # lazily: hivemind imports torch
    from hivemind.utils.multiaddr.exceptions import Error as MultiaddrError

    try:
        protocols = {protocol.name for protocol in Multiaddr(peer).protocols()}
    except (MultiaddrError, ValueError, TypeError) as error:
        return " ".join(str(error).split())[:MAX_SHOWN]
    if "p2p" not in protocols:
        return "no /p2p/<peer id> part"
    if not protocols & {"ip4", "ip6", "dns", "dns4", "dns6"} or not protocols & {"tcp", "udp"}:
        return "no host and port to dial"
    return None


def _peer_id_problem(peer: str) -> Optional[str]:
    """Why ``peer`` is not a base58 libp2p peer id (a multihash), or None."""
    import base58
    import multihash

    try:
        multihash.decode(base58.b58decode(peer))
    except (ValueError, TypeError) as error:
        return " ".join(str(error).split())[:MAX_SHOWN] or type(error).__name__
    return None


def _check_ordered(low: float, high: float) -> None:
    if low > high:
        raise RuleBroken(("low",), f"{low} is not allowed: must be <= {{section}}high ({high})")


def _checks_paths(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_paths", True))


def _absolute(path: str | Path, info: ValidationInfo) -> Path:
    """``path`` made absolute against the context's base_dir, lexically (no symlinks followed, no I/O)."""
    if "\0" in str(path):
        raise RuleBroken((), f"{show_value(str(path))} is not allowed: a path cannot contain a NUL character")
    base_dir = (info.context or {}).get("base_dir") or Path.cwd()
    return Path(os.path.abspath(Path(base_dir).expanduser() / Path(path).expanduser()))


def _resolve_tracking_uri(uri: Optional[str], output_dir: Path, info: ValidationInfo) -> str:
    if uri is None:
        return f"sqlite:///{output_dir / 'mlflow.db'}"
    if "\0" in uri:
        raise RuleBroken(
            ("mlflow", "tracking_uri"), f"{show_value(uri)} is not allowed: must not contain a NUL character"
        )
    if uri.startswith("sqlite:///"):
        if not uri[len("sqlite:///") :].strip():
            raise RuleBroken(("mlflow", "tracking_uri"), f"{show_value(uri)} is not allowed: names no database file")
        return f"sqlite:///{_absolute(uri[len('sqlite:///') :], info)}"
    if re.match(r"https?://", uri, re.IGNORECASE) and not _server_address(uri):
        raise RuleBroken(
            ("mlflow", "tracking_uri"), f"{show_value(uri)} is not allowed: names no valid server host and port"
        )
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if scheme is None or scheme.group(1).lower() == "file":
        raise RuleBroken(
            ("mlflow", "tracking_uri"),
            f"{show_value(uri)} is not allowed: MLflow refuses file stores; use sqlite:///<path>/mlflow.db, "
            "an http(s):// tracking server, or null for sqlite:///<output_dir>/mlflow.db",
        )
    return uri


def _server_address(uri: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(uri)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # e.g. a port beyond 65535 or an unclosed [IPv6 bracket
        return False
