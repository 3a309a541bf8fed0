"""Block hashes computed by the router equal the ones a real vllm-cpu engine publishes in its KV events."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from tinyserve.cache_router.block_hashing import BlockHasher, UnreproducibleHashError
from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.kv_event_subscriber import KVEventSubscriber
from tinyserve.cache_router.request_tokenizer import RequestTokenizer
from tinyserve.ports import free_port_pair

BLOCK = 32


def test_chain_covers_full_blocks_only_and_is_prefix_stable():
    h = BlockHasher(BLOCK, seed="s")
    a = list(range(100))
    b = a[:64] + [7] * 40
    ca, cb = h.chain(a), h.chain(b)
    assert len(ca) == 100 // BLOCK and len(cb) == 104 // BLOCK
    assert ca[:2] == cb[:2] and ca[2] != cb[2]
    assert h.chain(a[:31]) == []
    assert all(isinstance(x, int) and 0 <= x < 2**64 for x in ca)


def test_seed_salt_and_lora_change_the_chain():
    toks = list(range(64))
    base = BlockHasher(BLOCK, seed="s").chain(toks)
    assert BlockHasher(BLOCK, seed="t").chain(toks) != base
    salted = BlockHasher(BLOCK, seed="s").chain(toks, cache_salt="x")
    assert salted[0] != base[0] and salted[1] != base[1]  # the salt reaches every block through the chain
    assert BlockHasher(BLOCK, seed="s").chain(toks, lora_name="l")[1] != base[1]
    assert BlockHasher(BLOCK, seed="s", int_hashes=False).chain(toks)[0][-8:] == base[0].to_bytes(8, "big")


def test_xxhash_without_shared_seed_is_refused(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(UnreproducibleHashError):
        BlockHasher(BLOCK, algo="xxhash")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tinyserve.models.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


@pytest.fixture(scope="module")
def engine(model_dir):
    """One real vllm-cpu engine with prefix caching and ZMQ KV events (the plugin loaded as in production)."""
    from vllm import LLM
    from vllm.config import KVEventsConfig

    from tinyserve.engine.settings import AllocatorSettings, EngineSettings

    has_pool = importlib.util.find_spec("tinyserve.engine.block_pool") is not None
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HF_HUB_OFFLINE": "1",
        **EngineSettings(allocator=AllocatorSettings(enabled=has_pool)).to_env(),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port_pair()
    llm = LLM(
        model=model_dir,
        block_size=BLOCK,
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=True,
        kv_events_config=KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=f"tcp://*:{port}",
            replay_endpoint=f"tcp://*:{port + 1}",
        ),
    )
    yield llm, port
    del llm
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _wait(pred, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.slow
def test_hashes_equal_the_engine_events_and_tokenization_equals_the_engine(engine, model_dir):
    from vllm import SamplingParams

    llm, port = engine
    sp = SamplingParams(max_tokens=2, temperature=0.0)
    # Published before the subscriber exists: it must catch up through the replay socket.
    early = [11 + (i * 7) % 1500 for i in range(3 * BLOCK + 5)]
    llm.generate([{"prompt_token_ids": early}], sp, use_tqdm=False)

    index = KVBlockIndex()
    wrong_seed = BlockHasher(BLOCK, seed="not-the-engine-seed")
    checks: list[tuple[bool, bool]] = []

    def root_check(tokens, h, keys):
        checks.append((BlockHasher(BLOCK).first_block_matches(tokens, h, keys),
                       wrong_seed.first_block_matches(tokens, h, keys)))
        return checks[-1][0]

    sub = KVEventSubscriber(index, root_check=root_check)
    try:
        sub.add("r0", f"tcp://*:{port}", f"tcp://*:{port + 1}")
        hasher = BlockHasher(BLOCK)
        early_chain = hasher.chain(early)
        assert len(early_chain) == 3
        assert _wait(lambda: all(index.holds("r0", h) for h in early_chain)), "replay did not deliver early blocks"
        assert index.longest_prefix(early_chain, ["r0"]) == {"r0": 3}

        # Live events; a salted prompt with the same tokens must hash apart.
        live = [5 + (i * 13) % 1700 for i in range(5 * BLOCK + 1)]
        llm.generate([{"prompt_token_ids": live}, {"prompt_token_ids": live, "cache_salt": "tenant-a"}], sp, use_tqdm=False)
        for chain in (hasher.chain(live), hasher.chain(live, cache_salt="tenant-a")):
            assert len(chain) == 5
            assert _wait(lambda: index.longest_prefix(chain, ["r0"])["r0"] == 5), "live blocks missing"
        assert sub.streams()["r0"].complete

        # Chat: the router's tokenization (chat template included) equals the engine's prompt.
        messages = [
            {"role": "system", "content": "You are a terse assistant. " * 12},
            {"role": "user", "content": [{"type": "text", "text": "Summarise"}, {"type": "text", "text": "the rules."}]},
        ]
        out = llm.chat(messages, sp, use_tqdm=False)[0]
        mine = RequestTokenizer(model_dir).token_ids({"messages": messages})
        assert mine == list(out.prompt_token_ids)
        chat_chain = hasher.chain(mine)
        assert chat_chain and _wait(lambda: index.longest_prefix(chat_chain, ["r0"])["r0"] == len(chat_chain))

        # Every root block the engine published hashes the same here (salted ones included), and a router
        # with another seed would have been told so.
        assert len(checks) >= 4 and all(ok for ok, _ in checks) and not any(bad for _, bad in checks)
        assert sub.hash_agreement("r0") == (len(checks), 0)

        # Blocks the engine never cached are not in the index.
        assert index.longest_prefix(hasher.chain([3] * (2 * BLOCK)), ["r0"]) == {"r0": 0}
    finally:
        sub.stop()
