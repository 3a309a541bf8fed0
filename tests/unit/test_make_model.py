"""The embedded model: deterministic for a seed, loadable by transformers' tokenizer, chat template works."""

from __future__ import annotations

import hashlib
import json

import pytest

from tinyserve.models.make_model import MODEL_SIZES, make_model


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = digest(make_model(tmp_path / "a", "tiny", seed=0))
    b = digest(make_model(tmp_path / "b", "tiny", seed=0))
    c = digest(make_model(tmp_path / "c", "tiny", seed=1))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_config_is_llama_with_a_cpu_attention_head_size(tmp_path):
    out = make_model(tmp_path / "m", "tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


def test_small_is_about_thirty_million_parameters():
    s = MODEL_SIZES["small"]
    per_layer = (2 * s.hidden_size * s.num_heads * s.head_dim + 2 * s.hidden_size * s.num_kv_heads * s.head_dim
                 + 3 * s.hidden_size * s.intermediate_size)
    total = s.num_layers * per_layer + 2 * s.vocab_size * s.hidden_size
    assert 25e6 < total < 40e6


def test_tokenizer_round_trips_and_renders_the_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = make_model(tmp_path / "m", "tiny")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "The cache holds 12345 blocks, ünïcode too!"
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|user|>hi<|end|><|assistant|>"


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model size"):
        make_model(tmp_path / "x", "huge")
