"""ray_cluster.yaml passes the validation `ray up` applies before it touches a node, offline."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ptune_search.config import ConfigError, load_config
from tests.cluster.loopback_head import CLUSTER_YAML, REPO

pytestmark = pytest.mark.cluster


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validates(config: dict) -> None:
    """What `ray up` does first: fill in the provider's defaults, then check Ray's cluster-config schema."""
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_yaml_is_a_valid_local_provider_config():
    config = cluster_config()
    ray_validates(config)
    assert config["provider"]["type"] == "local"
    head_commands = "\n".join(config["head_start_ray_commands"])
    assert '\\"swarm_host\\"' in head_commands and "mlflow server --host 127.0.0.1" in head_commands


@pytest.mark.parametrize("path, misspelled", [((), "setup_comands"), (("auth",), "ssh_usr")])
def test_a_misspelled_key_is_refused(path, misspelled):
    config = cluster_config()
    section = config
    for key in path:
        section = section[key]
    right = {"setup_comands": "setup_commands", "ssh_usr": "ssh_user"}[misspelled]
    section[misspelled] = section.pop(right)
    with pytest.raises(jsonschema.ValidationError, match=misspelled):
        ray_validates(config)


def test_ray_swarm_mode_refuses_initial_peers():
    with pytest.raises(ConfigError, match=r"swarm.initial_peers: .* must be empty when swarm.mode is 'ray'"):
        load_config(
            REPO / "experiments" / "tiny.yaml",
            [
                "swarm.mode=ray",
                "swarm.initial_peers=[/ip4/127.0.0.1/tcp/1/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN]",
            ],
            check_paths=False,
        )
