"""TinyServe's patch of vLLM, loaded as a vLLM general plugin (see plugin.py)."""

from tinyserve.engine.settings import AllocatorSettings, EngineSettings, SelectionSettings

__all__ = ["AllocatorSettings", "EngineSettings", "SelectionSettings"]
