"""The TinyServe vLLM general plugin.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts: the API
process, the engine core and each worker. Each feature installs itself only where it applies and only
once per process; with `EngineSettings.enabled` false nothing is touched and vLLM runs stock.
"""

from __future__ import annotations

import os

from tinyserve.engine.settings import EngineSettings

__all__ = ["register", "installed_features"]

_installed: list[str] = []


def installed_features() -> list[str]:
    """Features the plugin installed in this process, in install order (empty when off)."""
    return list(_installed)


def register() -> None:
    if _installed:
        return
    settings = EngineSettings.from_env()
    if not settings.enabled:
        return
    from tinyserve.engine.stats_channel import install_stats_channel

    install_stats_channel(settings)
    _installed.append("stats")
    if settings.allocator.enabled:
        from tinyserve.engine.block_pool import install_block_pool

        install_block_pool(settings.allocator)
        _installed.append("allocator")
    if settings.selection.enabled:
        from tinyserve.engine.selection_backend import install_selection

        install_selection(settings.selection)
        _installed.append("selection")
    os.environ.setdefault("TINYSERVE_PLUGIN_PID", str(os.getpid()))
