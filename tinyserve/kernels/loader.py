"""Run-time compilation of csrc/*.cu through CuPy RawModule (NVRTC), one cached module per instantiation.

Owns the CuPy side of the kernels: which source a kernel lives in, the compile options for the current
card (``-arch=sm_XY``), the module cache, and launching on torch's current stream. Imports CuPy lazily;
``available()`` says whether CUDA kernels can run here. Invariant: a module is compiled at most once per
(source, instantiation, architecture) in a process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

_CSRC = Path(__file__).parent / "csrc"
_COMMON = "common.cu"


@functools.lru_cache(maxsize=1)
def _cupy() -> Any | None:
    try:
        import cupy  # noqa: PLC0415

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: the reference serves
        return None


def available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return _cupy() is not None


# sources whose kernels call device functions of another source (compiled in front of them)
_NEEDS = {"paged_attention.cu": ("page_select.cu",)}


@functools.lru_cache(maxsize=None)
def _source(name: str) -> str:
    parts = (_COMMON, *_NEEDS.get(name, ()), name)
    return "\n".join((_CSRC / part).read_text() for part in parts)


@functools.lru_cache(maxsize=None)
def _arch(device: int) -> str:
    cc = _cupy().cuda.Device(device).compute_capability   # e.g. "90"
    return f"-arch=sm_{cc}"


@functools.lru_cache(maxsize=None)
def kernel(source: str, name: str, device: int = 0) -> Any:
    """The compiled kernel ``name`` (a plain name or a template instantiation) from ``csrc/<source>``."""
    cp = _cupy()
    if cp is None:
        raise RuntimeError("CUDA kernels need CuPy and a CUDA device")
    with cp.cuda.Device(device):
        mod = cp.RawModule(code=_source(source), options=(_arch(device), "-std=c++17"),
                           name_expressions=(name,))
        return mod.get_function(name)


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device: int) -> Any:
    cp = _cupy()
    return cp.cuda.ExternalStream(ptr, device)


def launch(fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
    """Launch ``fn`` on torch's current CUDA stream. ``args`` are numpy scalars (pointers as uint64)."""
    import torch  # noqa: PLC0415

    dev = torch.cuda.current_device()
    stream = torch.cuda.current_stream(dev)
    with _external_stream(stream.cuda_stream, dev):
        fn(grid, block, args, shared_mem=shared_mem)


@functools.lru_cache(maxsize=None)
def num_sms(device: int = 0) -> int:
    """Multiprocessor count of the device."""
    cp = _cupy()
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])
