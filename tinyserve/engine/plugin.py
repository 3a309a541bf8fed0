"""The TinyServe vLLM general plugin.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts: the API
process, the engine core and each worker. Each feature installs itself only where it applies and only
once per process; with `EngineSettings.enabled` false nothing is touched and vLLM runs stock.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from tinyserve.engine.settings import EngineSettings

__all__ = ["register", "installed_features", "selection_backend_module"]

_installed: list[str] = []


def installed_features() -> list[str]:
    """Features the plugin installed in this process, in install order (empty when off)."""
    return list(_installed)


def selection_backend_module() -> ModuleType:
    """The query-aware attention backend for this platform: TinyServe's CUDA kernels on CUDA, else CPU."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return importlib.import_module("tinyserve.engine.cuda_selection_backend")
    return importlib.import_module("tinyserve.engine.selection_backend")


def register() -> None:
    if _installed:
        return
    settings = EngineSettings.from_env()
    if not settings.enabled:
        return
    from tinyserve.engine.vllm_compat import apply as apply_vllm_shims

    apply_vllm_shims()
    from tinyserve.engine.stats_channel import install_stats_channel

    install_stats_channel(settings)
    _installed.append("stats")
    if settings.allocator.enabled:
        from tinyserve.engine.block_pool import install_block_pool

        install_block_pool(settings.allocator)
        _installed.append("allocator")
    if settings.selection.enabled:
        selection_backend_module().install_selection(settings.selection)
        _installed.append("selection")
    os.environ.setdefault("TINYSERVE_PLUGIN_PID", str(os.getpid()))
