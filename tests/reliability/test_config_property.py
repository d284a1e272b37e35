"""Experiment configs, property-based: every valid config loads, every invalid one fails with a ConfigError that
names the broken field by its dotted path, and the ``ptune-search search`` command refuses it before any process
starts.

Valid configs are drawn field by field from the schema itself (so fields added later are covered with their
declared types and bounds); invalid ones are a valid config with one mistake of a known kind, which also
fixes the dotted path the error must name. tests/test_config.py holds the example-based tests of each message.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import annotated_types
import base58
import pytest
import ray
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ptune_search import cli
from ptune_search.config import ConfigError, ExperimentConfig, SamplerConfig, load_config, parse_config
from ptune_search.models.prompt_init import PROMPT_INITS, TEXT_PREFIX

FieldPath = tuple[str, ...]
TUNING_MODES = ("ptune", "deep_ptune")
SWARM_MODES = ("local", "ray", "external")


# --- the schema, read from the pydantic models ---


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One scalar or list field: its dotted path, base type and declared bounds."""

    path: FieldPath
    kind: str  # int, float, str, bool, path, literal, list
    optional: bool
    ge: Optional[float] = None
    gt: Optional[float] = None
    lt: Optional[float] = None
    min_length: Optional[int] = None

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


BOUNDS = {
    annotated_types.Ge: "ge",
    annotated_types.Gt: "gt",
    annotated_types.Lt: "lt",
    annotated_types.MinLen: "min_length",
}


def _constraints(info: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in info.metadata:
        if type(item) in BOUNDS:
            found[BOUNDS[type(item)]] = getattr(item, BOUNDS[type(item)])
        if isinstance(item, FieldInfo):
            found.update(_constraints(item))
    return found


def _leaf(path: FieldPath, info: FieldInfo) -> Leaf:
    annotation, optional, constraints = info.annotation, False, _constraints(info)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional, annotation = True, inner[0]
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *extras = typing.get_args(annotation)
            for extra in extras:
                constraints.update(_constraints(extra) if isinstance(extra, FieldInfo) else {})
    origin = typing.get_origin(annotation)
    if origin is list:
        kind = "list"
    elif origin is dict:
        kind = "dict"
    elif origin is typing.Literal:
        kind = "literal"
    else:
        kind = {int: "int", float: "float", str: "str", bool: "bool", Path: "path"}[annotation]
    return Leaf(path, kind, optional, **constraints)


def _walk(model: type[BaseModel], prefix: FieldPath = ()) -> tuple[list[FieldPath], list[Leaf]]:
    sections, leaves = [prefix], []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            more_sections, more_leaves = _walk(info.annotation, (*prefix, name))
            sections += more_sections
            leaves += more_leaves
        else:
            leaves.append(_leaf((*prefix, name), info))
    return sections, leaves


SECTIONS, LEAVES = _walk(ExperimentConfig)


def _fields_at(section: FieldPath) -> set[str]:
    model: type[BaseModel] = ExperimentConfig
    for key in section:
        model = model.model_fields[key].annotation  # type: ignore[assignment]
    return set(model.model_fields)


def _at(config: dict, path: FieldPath) -> Any:
    for key in path:
        config = config[key]
    return config


def _set(config: dict, path: FieldPath, value: Any) -> None:
    _at(config, path[:-1])[path[-1]] = value


# --- valid configs ---

NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
FINITE = dict(allow_nan=False, allow_infinity=False)


def peer_ids() -> st.SearchStrategy[str]:
    """Base58 sha2-256 multihashes: the ``Qm...`` peer ids hivemind prints."""
    return st.binary(min_size=8, max_size=8).map(
        lambda seed: base58.b58encode(b"\x12\x20" + hashlib.sha256(seed).digest()).decode()
    )


def multiaddrs() -> st.SearchStrategy[str]:
    hosts = st.one_of(
        st.ip_addresses(v=4).map(lambda ip: f"/ip4/{ip}"), st.ip_addresses(v=6).map(lambda ip: f"/ip6/{ip}")
    )
    return st.builds(lambda host, port, peer: f"{host}/tcp/{port}/p2p/{peer}", hosts, st.integers(1, 65535), peer_ids())


def _generic_value(leaf: Leaf) -> st.SearchStrategy[Any]:
    """A value the field's declared type and bounds allow (fields with rules of their own are drawn elsewhere)."""
    if leaf.kind == "int":
        low = int(leaf.ge if leaf.ge is not None else 0)
        return st.integers(low, low + 1000)
    if leaf.kind == "float":
        low = next((bound for bound in (leaf.ge, leaf.gt) if bound is not None), 0.0)
        return st.floats(min_value=low, max_value=low + 1e6, exclude_min=leaf.gt is not None, **FINITE)
    if leaf.kind == "bool":
        return st.booleans()
    if leaf.kind == "str":
        return NAMES
    raise AssertionError(f"no generic valid value for {leaf.dotted} ({leaf.kind}); draw it in valid_configs")


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A whole config, every section present, every cross-field rule kept."""
    config: dict[str, Any] = {section[0]: {} for section in SECTIONS if len(section) == 1}
    for leaf in LEAVES:
        if leaf.kind in ("int", "float", "bool", "str"):
            if leaf.optional and draw(st.booleans()):
                _set_leaf(config, leaf.path, None)
            else:
                _set_leaf(config, leaf.path, draw(_generic_value(leaf)))
    config["model"] = "tiny-llama"
    config["task"]["name"] = "bbc_news"
    text_column = config["task"]["text_column"]
    config["task"]["label_column"] = draw(NAMES.filter(lambda name: name != text_column))
    config["output_dir"] = draw(st.sampled_from(["runs/a", "out", ".", "/tmp/ptune-property/x"]))
    config["mlflow"]["tracking_uri"] = draw(
        st.one_of(st.none(), st.just("sqlite:///db/mlflow.db"), st.just("http://127.0.0.1:5000"))
    )
    swarm = config["swarm"]
    swarm["mode"] = draw(st.sampled_from(SWARM_MODES))
    swarm["replicas"] = draw(st.integers(1, 4))
    swarm["servers"] = swarm["replicas"] * draw(st.integers(1, 4))
    swarm["initial_peers"] = draw(st.lists(multiaddrs(), min_size=1, max_size=3)) if swarm["mode"] == "external" else []
    external = swarm["mode"] == "external"
    swarm["trusted_servers"] = draw(st.one_of(st.none(), st.lists(peer_ids(), max_size=2))) if external else None
    space = config["search_space"]
    modes = draw(st.permutations(TUNING_MODES))
    space["tuning_modes"] = list(modes[: draw(st.integers(1, len(modes)))])
    inits = draw(st.permutations([*PROMPT_INITS, f"{TEXT_PREFIX}{draw(NAMES.filter(str.strip))}"]))
    space["prompt_init"] = list(inits[: draw(st.integers(1, len(inits)))])
    low = draw(st.integers(1, 64))
    space["pre_seq_len"] = {"low": low, "high": draw(st.integers(low, 128))}
    for name in ("lr", "head_lr"):
        lr_low = draw(st.floats(1e-8, 1.0, **FINITE))
        space[name] = {"low": lr_low, "high": draw(st.floats(lr_low, 10.0, **FINITE))}
    space["template"] = draw(st.builds("{}{{text}}{}".format, NAMES, NAMES).filter(lambda t: t.count("{text}") == 1))
    space["heads"] = draw(st.sampled_from([["linear"], ["label_words"], ["linear", "label_words"]]))
    config["task"]["label_words"] = draw(st.dictionaries(NAMES, NAMES, max_size=2))
    budget = config["budget"]
    budget["max_steps"] = draw(st.integers(1, 1000))
    budget["eval_every"] = draw(st.integers(1, budget["max_steps"]))
    config["scheduler"]["grace_period"] = draw(st.integers(1, budget["max_steps"]))
    config["scheduler"]["reduction_factor"] = draw(st.floats(1.0, 10.0, exclude_min=True, **FINITE))
    config["search"]["sampler"] = draw(
        st.sampled_from(typing.get_args(SamplerConfig.model_fields["sampler"].annotation))
    )
    config["seed"] = draw(st.integers(0, 2**32 - 1))
    return config


def _set_leaf(config: dict, path: FieldPath, value: Any) -> None:
    section = config
    for key in path[:-1]:
        section = section.setdefault(key, {})
    section[path[-1]] = value


# --- invalid configs: a valid one with one mistake, and the field the error must name ---


@dataclasses.dataclass
class Mistake:
    config: dict[str, Any]
    field: str  # the dotted path the error must name
    single: bool  # the only problem reported (a moved field may also leave a default that breaks a rule)


ANY_SCALAR = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.floats(-5, 5, **FINITE))
LISTS = st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=2)
MAPPINGS = st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
WRONG_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "int": st.one_of(st.booleans(), st.floats(), st.text(max_size=6), LISTS, MAPPINGS),
    "float": st.one_of(st.booleans(), st.text(max_size=6), LISTS, MAPPINGS),
    "str": st.one_of(st.integers(), st.floats(), st.booleans(), LISTS, MAPPINGS),
    "bool": st.one_of(st.integers(), st.text(max_size=6), st.floats(**FINITE)),
    "path": st.one_of(st.integers(), st.floats(), st.booleans(), LISTS, MAPPINGS),
    "literal": st.one_of(st.integers(), st.booleans(), LISTS, MAPPINGS),
    "list": st.one_of(st.integers(), st.text(max_size=6), st.booleans(), MAPPINGS),
    "dict": st.one_of(st.integers(), st.text(max_size=6), st.booleans(), LISTS),
}


def wrong_type(draw: st.DrawFn, config: dict) -> Mistake:
    leaf = draw(st.sampled_from(LEAVES))
    wrong = WRONG_TYPES[leaf.kind]
    value = draw(wrong if leaf.optional else st.one_of(st.none(), wrong))
    _set(config, leaf.path, value)
    return Mistake(config, leaf.dotted, single=True)


def out_of_range(draw: st.DrawFn, config: dict) -> Mistake:
    bounded = [leaf for leaf in LEAVES if {leaf.ge, leaf.gt, leaf.lt, leaf.min_length} != {None}]
    leaf = draw(st.sampled_from(bounded))
    choices: list[st.SearchStrategy[Any]] = []
    if leaf.ge is not None:
        below = st.integers(max_value=int(leaf.ge) - 1) if leaf.kind == "int" else st.floats(max_value=leaf.ge)
        choices.append(below.filter(lambda value: value < leaf.ge))
    if leaf.gt is not None:
        choices.append(st.floats(max_value=leaf.gt, allow_nan=False))
    if leaf.lt is not None:
        choices.append(st.integers(min_value=int(leaf.lt)))
    if leaf.min_length is not None:
        choices.append(st.just([] if leaf.kind == "list" else ""))
    if leaf.kind == "float":
        choices.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    _set(config, leaf.path, draw(st.one_of(choices)))
    return Mistake(config, leaf.dotted, single=True)


# YAML reads NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR as line breaks, and PyYAML writes them unescaped: a key
# holding one cannot be written to a config file at all, so the keys drawn here leave them out.
KEY_TEXT = st.text(st.characters(exclude_characters="\x85\u2028\u2029"), min_size=1, max_size=10)


def unknown_key(draw: st.DrawFn, config: dict) -> Mistake:
    section = draw(st.sampled_from(SECTIONS))
    allowed = _fields_at(section)
    key = draw(st.one_of(KEY_TEXT.filter(lambda k: k not in allowed), st.integers(-3, 99)))
    _at(config, section)[key] = draw(ANY_SCALAR)
    return Mistake(config, ".".join([*section, str(key)]), single=True)


def wrong_nesting(draw: st.DrawFn, config: dict) -> Mistake:
    nested_leaves = [leaf for leaf in LEAVES if len(leaf.path) >= 2]
    how = draw(st.sampled_from(["field to another section", "section as a scalar", "section inside another"]))
    if how == "field to another section":
        leaf = draw(st.sampled_from(nested_leaves))
        target = draw(st.sampled_from([s for s in SECTIONS if leaf.path[-1] not in _fields_at(s)]))
        _at(config, target)[leaf.path[-1]] = _at(config, leaf.path[:-1]).pop(leaf.path[-1])
        return Mistake(config, ".".join([*target, leaf.path[-1]]), single=False)
    sections = [s for s in SECTIONS if s]
    section = draw(st.sampled_from(sections))
    if how == "section as a scalar":
        _set(config, section, draw(st.one_of(ANY_SCALAR, LISTS)))
        return Mistake(config, ".".join(section), single=True)
    outside = [s for s in SECTIONS if s[: len(section)] != section and section[-1] not in _fields_at(s)]
    target = draw(st.sampled_from(outside))
    moved = _at(config, section[:-1]).pop(section[-1])
    _at(config, target)[section[-1]] = moved
    return Mistake(config, ".".join([*target, section[-1]]), single=False)


def bad_enum(draw: st.DrawFn, config: dict) -> Mistake:
    if draw(st.booleans()):
        config["swarm"]["mode"] = draw(st.text(max_size=10).filter(lambda mode: mode not in SWARM_MODES))
        return Mistake(config, "swarm.mode", single=True)
    modes = config["search_space"]["tuning_modes"]
    index = draw(st.integers(0, len(modes)))
    unknown_mode = st.text(max_size=10).filter(lambda mode: mode not in TUNING_MODES)
    modes.insert(index, draw(st.one_of(unknown_mode, st.integers(), st.none())))
    return Mistake(config, f"search_space.tuning_modes[{index}]", single=True)


def inconsistent_pair(draw: st.DrawFn, config: dict) -> Mistake:
    budget, swarm, space = config["budget"], config["swarm"], config["search_space"]
    rule = draw(
        st.sampled_from(
            [
                "eval_every",
                "grace_period",
                "pre_seq_len",
                "lr",
                "repeated mode",
                "servers",
                "columns",
                "external",
                "peers",
            ]
        )
    )
    if rule == "eval_every":
        budget["eval_every"] = budget["max_steps"] + draw(st.integers(1, 100))
        return Mistake(config, "budget.eval_every", single=True)
    if rule == "grace_period":
        config["scheduler"]["grace_period"] = budget["max_steps"] + draw(st.integers(1, 100))
        return Mistake(config, "scheduler.grace_period", single=True)
    if rule == "pre_seq_len":
        space["pre_seq_len"]["low"] = space["pre_seq_len"]["high"] + draw(st.integers(1, 100))
        return Mistake(config, "search_space.pre_seq_len.low", single=True)
    if rule == "lr":
        space["lr"]["low"] = space["lr"]["high"] * draw(st.floats(1.0, 1e3, exclude_min=True, **FINITE))
        return Mistake(config, "search_space.lr.low", single=True)
    if rule == "repeated mode":
        space["tuning_modes"].append(draw(st.sampled_from(space["tuning_modes"])))
        return Mistake(config, f"search_space.tuning_modes[{len(space['tuning_modes']) - 1}]", single=True)
    if rule == "servers":
        swarm.update(
            mode=draw(st.sampled_from(["local", "ray"])),
            trusted_servers=None,
            initial_peers=[],
            replicas=draw(st.integers(2, 5)),
        )
        swarm["servers"] = swarm["replicas"] * draw(st.integers(0, 3)) + draw(st.integers(1, swarm["replicas"] - 1))
        return Mistake(config, "swarm.servers", single=True)
    if rule == "columns":
        config["task"]["label_column"] = config["task"]["text_column"]
        return Mistake(config, "task.label_column", single=True)
    if rule == "external":
        swarm.update(mode="external", initial_peers=[])
        if draw(st.booleans()):
            del swarm["initial_peers"]
        return Mistake(config, "swarm.initial_peers", single=True)
    peers = draw(st.lists(multiaddrs(), min_size=1, max_size=2))  # given, while the search starts its own swarm
    swarm.update(mode=draw(st.sampled_from(["local", "ray"])), trusted_servers=None, initial_peers=peers)
    swarm["servers"] = swarm["replicas"]
    return Mistake(config, "swarm.initial_peers", single=True)


BASE58 = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
NOT_BASE58 = st.text(min_size=1, max_size=20).filter(lambda peer: set(peer) - BASE58)
BAD_MULTIADDRS = st.one_of(
    st.text(max_size=30),
    st.builds("/ip4/{}.0.0.1/tcp/31337/p2p/{}".format, st.integers(256, 999), peer_ids()),
    st.builds("/ip4/10.0.0.1/tcp/{}/p2p/{}".format, st.integers(65536, 10**6), peer_ids()),
    st.builds("/ip4/10.0.0.1/tcp/{}".format, st.integers(1, 65535)),
    st.builds("/ip4/10.0.0.1/tcp/31337/p2p/{}".format, NOT_BASE58),
    st.builds("/p2p/{}".format, peer_ids()),
    st.builds("/ip4/10.0.0.1/p2p/{}".format, peer_ids()),
    st.builds("/ipx/10.0.0.1/tcp/1/p2p/{}".format, peer_ids()),
    st.builds("10.0.0.1:{}".format, st.integers(1, 65535)),
)


def bad_multiaddr(draw: st.DrawFn, config: dict) -> Mistake:
    peers = draw(st.lists(multiaddrs(), max_size=2))
    index = draw(st.integers(0, len(peers)))
    peers.insert(index, draw(BAD_MULTIADDRS))
    config["swarm"].update(mode="external", initial_peers=peers)
    return Mistake(config, f"swarm.initial_peers[{index}]", single=True)


def bad_location(draw: st.DrawFn, config: dict) -> Mistake:
    """Paths and URIs: missing files, NUL bytes, an empty output_dir, tracking URIs MLflow cannot use."""
    what = draw(st.sampled_from(["model", "task.name", "output_dir", "mlflow.tracking_uri"]))
    nul = st.builds("{}\0{}".format, st.text(max_size=4), st.text(max_size=4))
    if what == "model":
        value = draw(st.one_of(st.just("/nonexistent/llama"), st.just("/"), nul))
    elif what == "task.name":
        value = draw(st.one_of(st.just("/nonexistent/data.csv"), st.just("news.txt"), nul.map(lambda s: s + ".jsonl")))
    elif what == "output_dir":
        value = draw(st.one_of(st.just(""), st.just("  "), nul))
    else:
        value = draw(
            st.sampled_from(
                [
                    "mlruns",
                    "file:///tmp/m",
                    "sqlite:///",
                    "http://",
                    "https://:5000",
                    "http://host:99999",
                    "sqlite:///a\0b",
                ]
            )
        )
    _set(config, tuple(what.split(".")), value)
    return Mistake(config, what, single=True)


MISTAKES: list[Callable[[st.DrawFn, dict], Mistake]] = [
    wrong_type,
    out_of_range,
    unknown_key,
    wrong_nesting,
    bad_enum,
    inconsistent_pair,
    bad_multiaddr,
    bad_location,
]


@st.composite
def invalid_configs(draw: st.DrawFn) -> Mistake:
    config = copy.deepcopy(draw(valid_configs()))
    return draw(st.sampled_from(MISTAKES))(draw, config)


def _named(problems: list[str], field: str) -> bool:
    return any(problem.startswith(f"{field}: ") for problem in problems)


# --- properties ---

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("configs")


@PROPERTY
@given(data=valid_configs())
def test_every_valid_config_loads_with_its_values(base_dir: Path, data: dict[str, Any]) -> None:
    config = parse_config(data, base_dir)
    loaded = config.to_dict()
    for leaf in LEAVES:
        given_value = _at(data, leaf.path)
        if leaf.kind != "path" and leaf.path not in {("model",), ("task", "name"), ("mlflow", "tracking_uri")}:
            assert _at(loaded, leaf.path) == given_value, leaf.dotted
    assert config.output_dir == Path(os.path.abspath(base_dir / data["output_dir"]))
    resolved = base_dir / "resolved.yaml"
    resolved.write_text(config.to_yaml())
    assert load_config(resolved) == config


@PROPERTY
@given(mistake=invalid_configs())
def test_every_invalid_config_fails_naming_its_field(base_dir: Path, mistake: Mistake) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(mistake.config, base_dir)
    problems = info.value.problems
    assert _named(problems, mistake.field), f"{mistake.field} not named in {problems}"
    if mistake.single:
        assert len(problems) == 1, problems


# --- the command refuses before anything starts ---


class _ConfigDumper(yaml.SafeDumper):
    """Quotes strings the config loader would read as floats (``1e-3``), so a file says what the dict said."""


_ConfigDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

PROCESS_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system"}
_process_events: Optional[list[str]] = None  # recording while not None


def _record_process_events(event: str, args: tuple[Any, ...]) -> None:
    if _process_events is not None and event in PROCESS_EVENTS:
        _process_events.append(f"{event} {args!r}"[:300])


@pytest.fixture(scope="module")
def command_imported(base_dir: Path) -> None:
    """The command's first run imports mlflow and trio (its parser) and hivemind and torch (validation), and
    those first imports run ``uname -p`` and ``ldconfig -p``: once per interpreter, whatever the config. They
    are done here, so the processes counted below are the ones a config makes the command start. The audit
    hook that counts them stays for the interpreter's life (hooks cannot be removed); it only records."""
    global _process_events
    sys.addaudithook(_record_process_events)
    _process_events = []
    subprocess.run(["true"], check=True)  # the hook sees a process start
    assert _process_events and _process_events[0].startswith("subprocess.Popen"), _process_events
    _process_events = None
    peer = "/ip4/10.0.0.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    parse_config({"swarm": {"mode": "external", "initial_peers": [peer]}}, base_dir, check_paths=False)
    with pytest.raises(SystemExit):
        cli.main(["search", str(base_dir / "no-such-config.yaml")])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mistake=invalid_configs())
def test_the_command_refuses_an_invalid_config_before_any_process_starts(
    base_dir: Path, command_imported: None, mistake: Mistake
) -> None:
    global _process_events
    output_dir = base_dir / "never-created"
    config = copy.deepcopy(mistake.config)
    if not mistake.field.startswith("output_dir"):
        config["output_dir"] = str(output_dir)
    config_file = base_dir / "experiment.yaml"
    config_file.write_text(yaml.dump(config, Dumper=_ConfigDumper, allow_unicode=True))
    with pytest.raises(ConfigError) as info:  # the file says what the mapping said
        load_config(config_file)
    assert _named(info.value.problems, mistake.field), info.value.problems

    _process_events = []
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["search", str(config_file)])
        started = list(_process_events)
    finally:
        _process_events = None
    assert exit_info.value.code == f"ptune-search search: error: {info.value}"
    assert started == [], f"an invalid config started processes: {started}"
    assert not ray.is_initialized()
    assert not output_dir.exists()
