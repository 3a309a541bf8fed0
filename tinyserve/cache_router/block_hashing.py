"""The engine's prefix-cache block-hash chain, computed outside the engine.

vLLM identifies a full KV block by a hash chained over the whole prefix that ends at it:
``h_i = H((h_{i-1}, tuple(tokens of block i), extra_keys_i))`` with ``h_{-1} = NONE_HASH = H(seed)``.
``H`` is the engine's ``prefix_caching_hash_algo`` (default ``sha256``: SHA-256 of the highest-protocol
pickle; ``sha256_cbor``: SHA-256 of canonical CBOR). The seed is ``PYTHONHASHSEED`` when set, else the fixed
string ``"vllm-none-hash"`` for the cryptographic algorithms; the xxhash algorithms use a random per-process
seed unless ``PYTHONHASHSEED`` is set, so a router can only reproduce them with that variable shared.
Extra keys per block are LoRA name, then the cache salt (first block only); multimodal inputs and prompt
embeddings are not routed by content here (such requests are routed without a cache match).

KV events carry ``ExternalBlockHash``: with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` (default 1) the low 64
bits of the digest as an int, else the digest bytes. The chain itself always feeds the full digest forward.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

__all__ = [
    "DEFAULT_SEED",
    "UnreproducibleHashError",
    "BlockHasher",
    "external_block_hash",
]

DEFAULT_SEED = "vllm-none-hash"
_MASK64 = (1 << 64) - 1


class UnreproducibleHashError(RuntimeError):
    """The engine's hash seed is random per process: the router cannot compute its block hashes."""


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _xxhash_fn(use_cbor: bool) -> Callable[[Any], bytes]:
    import xxhash  # optional, as in vLLM

    if use_cbor:
        return lambda obj: xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))
    return lambda obj: xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _hash_function(algo: str) -> Callable[[Any], bytes]:
    if algo == "sha256":
        return _sha256_pickle
    if algo == "sha256_cbor":
        return _sha256_cbor
    if algo in ("xxhash", "xxhash_cbor"):
        return _xxhash_fn(algo == "xxhash_cbor")
    raise ValueError(f"unknown prefix_caching_hash_algo {algo!r}")


def external_block_hash(digest: bytes, as_int: bool = True) -> int | bytes:
    """The form a digest takes in KV events (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`)."""
    return int.from_bytes(digest, "big") & _MASK64 if as_int else digest


class BlockHasher:
    """Computes a prompt's block-hash chain exactly as one engine does.

    Owns the hash function, the chain's root (NONE_HASH from the seed), the block size and the event
    hash form. Invariants: only full blocks are hashed (``len(chain) == len(tokens) // block_size``);
    ``chain[i]`` depends on every token before ``(i + 1) * block_size`` and on nothing after it.

    Args:
        block_size: tokens per KV block, the engine's ``cache_config.block_size``.
        algo: the engine's ``prefix_caching_hash_algo``.
        seed: the engine's ``PYTHONHASHSEED``; None reads this process's variable, which must match the
            engine's (Ray passes the driver's environment through ``runtime_env``).
        int_hashes: the engine's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``; None reads this process's.
    """

    def __init__(
        self,
        block_size: int,
        algo: str = "sha256",
        seed: str | None = None,
        int_hashes: bool | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.algo = algo
        if seed is None:
            seed = os.environ.get("PYTHONHASHSEED")
        if seed is None:
            if algo.startswith("xxhash"):
                raise UnreproducibleHashError(
                    f"{algo} uses a random per-process seed unless PYTHONHASHSEED is set for the engine"
                )
            seed = DEFAULT_SEED
        self.seed = seed
        self._hash = _hash_function(algo)
        if int_hashes is None:
            int_hashes = bool(int(os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")))
        self.int_hashes = int_hashes
        self._root = self._hash(seed)

    def digests(
        self,
        token_ids: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        max_blocks: int | None = None,
    ) -> list[bytes]:
        """Full digests of the prompt's full blocks, in order (at most ``max_blocks``)."""
        bs = self.block_size
        n = len(token_ids) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        out: list[bytes] = []
        parent = self._root
        lora = [lora_name] if lora_name else []
        for i in range(n):
            keys = lora + ([cache_salt] if (i == 0 and cache_salt) else [])
            parent = self._hash((parent, tuple(token_ids[i * bs : (i + 1) * bs]), tuple(keys) if keys else None))
            out.append(parent)
        return out

    def chain(
        self,
        token_ids: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        max_blocks: int | None = None,
    ) -> list[int | bytes]:
        """The chain in the form KV events carry it (ints by default)."""
        if self.int_hashes:
            return [int.from_bytes(d, "big") & _MASK64 for d in self.digests(token_ids, lora_name, cache_salt, max_blocks)]
        return list(self.digests(token_ids, lora_name, cache_salt, max_blocks))

    def first_block_matches(self, token_ids: Sequence[int], event_hash: int | bytes,
                            extra_keys: tuple | None = None) -> bool:
        """Whether a published root block (``parent_block_hash is None``) hashes here to the engine's value:
        the check that this hasher's seed, algorithm and block size are the engine's."""
        if len(token_ids) < self.block_size:
            return True  # a partial block: nothing to compare
        digest = self._hash((self._root, tuple(token_ids[: self.block_size]), extra_keys))
        return external_block_hash(digest, self.int_hashes) == event_hash
