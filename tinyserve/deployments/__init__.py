"""TinyServe deployments: the YAML config schema, the Ray Serve app builder and the replica class."""

from tinyserve.deployments.app import build_app, build_app_from_config, build_llm_config
from tinyserve.deployments.config import ConfigError, TinyServeConfig, load_config

__all__ = ["build_app", "build_app_from_config", "build_llm_config", "ConfigError", "TinyServeConfig", "load_config"]
