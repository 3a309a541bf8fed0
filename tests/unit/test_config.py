"""The deployment config schema: defaults, overrides, and errors that name the offending field."""

from __future__ import annotations

import pytest

from tinyserve.deployments.app import _deployment_config, _engine_kwargs, _replica_env
from tinyserve.deployments.config import ConfigError, TinyServeConfig, load_config
from tinyserve.engine.settings import ENV_VAR, EngineSettings


def test_packaged_default_serves_two_replicas_on_loopback():
    config = load_config()
    assert config.deployment.num_replicas == 2
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8000)
    assert config.model.make_size == "tiny"
    assert config.tinyserve.enabled and config.tinyserve.allocator.enabled


def test_unknown_field_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("deployment:\n  num_replicaz: 3\n")
    with pytest.raises(ConfigError, match=r"deployment\.num_replicaz"):
        load_config(path)


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"engine\.block_size"):
        TinyServeConfig.from_dict({"engine": {"block_size": "big"}})


def test_selection_needs_exactly_one_budget():
    with pytest.raises(ConfigError, match=r"tinyserve\.selection"):
        TinyServeConfig.from_dict({"tinyserve": {"selection": {"enabled": True}}})
    ok = TinyServeConfig.from_dict({"tinyserve": {"selection": {"enabled": True, "budget_fraction": 0.25}}})
    assert ok.tinyserve.selection.budget_fraction == 0.25


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_merge_into_nested_sections():
    config = load_config(None, overrides={"engine": {"max_model_len": 1024}, "router": {"kind": "power_of_two"}})
    assert config.engine.max_model_len == 1024
    assert config.engine.block_size == 32  # untouched sibling keeps the default
    assert config.router.kind == "power_of_two"


def test_engine_settings_travel_to_the_replicas_environment():
    config = TinyServeConfig.from_dict({"tinyserve": {"allocator": {"enabled": False}}})
    env = _replica_env(config)
    assert EngineSettings.model_validate_json(env[ENV_VAR]) == config.tinyserve
    assert env["HF_HUB_OFFLINE"] == "1"
    assert EngineSettings.from_env(env).allocator.enabled is False
    assert EngineSettings.from_env({}) == EngineSettings()


def test_router_kind_selects_the_request_router_and_kv_events():
    aware = TinyServeConfig.from_dict({"router": {"kind": "query_aware"}})
    assert _deployment_config(aware)["request_router_config"]["request_router_class"].endswith("QueryAwareRouter")
    assert _engine_kwargs(aware)["kv_events_config"]["enable_kv_cache_events"] is True
    p2c = TinyServeConfig.from_dict({"router": {"kind": "power_of_two"}})
    assert "request_router_config" not in _deployment_config(p2c)
    assert "kv_events_config" not in _engine_kwargs(p2c)


def test_autoscaling_replaces_a_fixed_replica_count():
    config = TinyServeConfig.from_dict({"deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    dep = _deployment_config(config)
    assert "num_replicas" not in dep
    assert dep["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ConfigError, match="min_replicas"):
        TinyServeConfig.from_dict({"deployment": {"autoscaling": {"min_replicas": 4, "max_replicas": 2}}})
