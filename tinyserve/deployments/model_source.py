"""Resolves the model a deployment serves and builds the embedded one where it is missing."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

__all__ = ["ensure_model_dir", "MAKE_SIZE_KEY", "MAKE_SEED_KEY"]

# Keys in LLMConfig.experimental_configs that carry the build recipe to every replica's node.
MAKE_SIZE_KEY = "tinyserve_make_model_size"
MAKE_SEED_KEY = "tinyserve_make_model_seed"


def ensure_model_dir(path: str, recipe: dict[str, Any] | None = None) -> Path:
    """Return `path`, first building the embedded model there if it has no config.json and a recipe says how.

    Safe when several replicas on one node race: the build holds an exclusive file lock.
    """
    model_dir = Path(path)
    if (model_dir / "config.json").exists():
        return model_dir
    size = (recipe or {}).get(MAKE_SIZE_KEY)
    if size is None:
        raise FileNotFoundError(f"model directory {model_dir} has no config.json and no make_size is configured")
    from tinyserve.models.make_model import make_model

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(str(model_dir) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        make_model(model_dir, size=size, seed=int((recipe or {}).get(MAKE_SEED_KEY, 0)))
    return model_dir
