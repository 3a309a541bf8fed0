"""Turns a TinyServe config into a Ray Serve application built on ray.serve.llm.

`build_app` is the import path for `serve run`, `serve deploy` and a KubeRay RayService
(`import_path: tinyserve.deployments:build_app`, `args: {config: path.yaml, ...overrides}`);
`tinyserve serve` uses `build_app_from_config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tinyserve.deployments.config import TinyServeConfig, load_config
from tinyserve.deployments.model_source import MAKE_SEED_KEY, MAKE_SIZE_KEY, ensure_model_dir

__all__ = ["build_app", "build_app_from_config", "build_llm_config", "ROUTER_CLASSES"]

# Router kinds of the config, as Ray Serve request-router class paths (None: Ray's power-of-two default).
ROUTER_CLASSES: dict[str, str | None] = {
    "query_aware": "tinyserve.cache_router:QueryAwareRouter",
    "prefix_affinity": "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
    "power_of_two": None,
}


def _replica_env(config: TinyServeConfig) -> dict[str, str]:
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": f"{config.engine.cpu_kv_cache_gib:g}",
        # Block hashes must be reproducible outside the engine (the router recomputes them).
        "PYTHONHASHSEED": "0",
    }
    if "TINYSERVE_STATS_PERIOD_S" in os.environ:
        env["TINYSERVE_STATS_PERIOD_S"] = os.environ["TINYSERVE_STATS_PERIOD_S"]
    env.update(config.tinyserve.to_env())
    return env


def _engine_kwargs(config: TinyServeConfig) -> dict[str, Any]:
    engine = config.engine
    kwargs: dict[str, Any] = {
        "block_size": engine.block_size,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enforce_eager": engine.enforce_eager,
        "dtype": engine.dtype,
    }
    if engine.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    if config.router.kind == "query_aware":
        # Port 0: each replica picks its own free ports at start (TinyServeLLMServer).
        host = "127.0.0.1" if config.router.kv_events_bind == "loopback" else "0.0.0.0"
        kwargs["kv_events_config"] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://{host}:0",
            "replay_endpoint": f"tcp://{host}:0",
            "topic": "kv-events",
        }
    kwargs.update(engine.extra)
    # vLLM's request log prints prompts: off unless the gateway config asks for it (or engine.extra sets it).
    kwargs.setdefault("enable_log_requests", config.gateway.log_prompts)
    return kwargs


def _deployment_config(config: TinyServeConfig) -> dict[str, Any]:
    dep = config.deployment
    out: dict[str, Any] = {"max_ongoing_requests": dep.max_ongoing_requests}
    # Requests waiting for a replica, past which Ray Serve raises BackPressureError (the ingress answers 429).
    out["max_queued_requests"] = config.gateway.max_queued_requests
    if dep.autoscaling is None:
        out["num_replicas"] = dep.num_replicas
    else:
        auto = dep.autoscaling
        auto_cfg: dict[str, Any] = {
            "min_replicas": auto.min_replicas,
            "max_replicas": auto.max_replicas,
            "upscale_delay_s": auto.upscale_delay_s,
            "downscale_delay_s": auto.downscale_delay_s,
        }
        if auto.initial_replicas is not None:
            auto_cfg["initial_replicas"] = auto.initial_replicas
        if auto.policy == "kv_pressure":
            auto_cfg["policy"] = {
                "policy_function": "tinyserve.autoscaling:kv_pressure_policy",
                "policy_kwargs": auto.policy_kwargs,
            }
        out["autoscaling_config"] = auto_cfg
    router_cls = ROUTER_CLASSES[config.router.kind]
    if router_cls is not None:
        out["request_router_config"] = {
            "request_router_class": router_cls,
            "request_router_kwargs": dict(config.router.options),
            "request_routing_stats_period_s": 1.0,
        }
    return out


def resolve_device(config: TinyServeConfig) -> str:
    """"cpu" or "gpu": the configured device, or for "auto" which vLLM distribution is installed."""
    if config.engine.device != "auto":
        return config.engine.device
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return "gpu"
    return "cpu"


def build_llm_config(config: TinyServeConfig) -> Any:
    """The ray.serve.llm LLMConfig for one TinyServe deployment."""
    from ray.serve.llm import LLMConfig

    model_path = str(Path(config.model.path).expanduser().resolve())
    recipe = {MAKE_SIZE_KEY: config.model.make_size, MAKE_SEED_KEY: config.model.seed}
    ensure_model_dir(model_path, recipe)
    return LLMConfig(
        model_loading_config={"model_id": config.model.id, "model_source": model_path},
        engine_kwargs=_engine_kwargs(config),
        runtime_env={"env_vars": _replica_env(config)},
        deployment_config=_deployment_config(config),
        server_cls="tinyserve.deployments.llm_server:TinyServeLLMServer",
        experimental_configs=recipe,
        accelerator_config={"kind": resolve_device(config)},
        log_engine_metrics=True,
    )


def build_app_from_config(config: TinyServeConfig) -> Any:
    """The Ray Serve application: OpenAI ingress in front of TinyServe LLMServer replicas."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({
        "llm_configs": [build_llm_config(config)],
        "ingress_cls_config": {
            "ingress_cls": "tinyserve.deployments.ingress:TinyServeIngress",
            "ingress_extra_kwargs": {"gateway": config.gateway.model_dump()},
        },
    })


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Ray Serve application builder: `args` may name `config` (a YAML path); other keys override it."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_app_from_config(load_config(path, overrides=args))
