"""Builds TinyServe's embedded default model offline.

The model is a Llama-architecture causal LM with seeded random weights, a byte-level BPE tokenizer trained
offline on a seeded synthetic corpus, and a chat template: everything vLLM needs to load it from a local
directory with no model hub. The same seed and size give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

__all__ = ["ModelSize", "MODEL_SIZES", "make_model", "default_model_dir"]

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# A small fixed vocabulary for the synthetic training corpus; the byte-level BPE still encodes any text.
_WORDS = (
    "the of and to in is it that for on with as was be by this are at from or an have not which but all "
    "they one can had has been there were more we their when if what so no up out about who them into "
    "time only new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three cache block page token query key value request replica "
    "model serve router memory attention decode prefill latency throughput kernel tensor layer head batch "
    "prefix hash event queue load pressure scale cluster node pod metric gauge counter histogram error"
).split()


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Shape of one embedded model size (Llama architecture)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


MODEL_SIZES: dict[str, ModelSize] = {
    # Head size 64: one of vLLM's CPU attention head sizes. GQA (2 query heads per KV head) in both.
    "tiny": ModelSize(256, 2, 4, 2, 512, 2048, 4096),
    "small": ModelSize(512, 8, 8, 4, 1408, 8192, 32768),
}


def default_model_dir(size: str = "tiny") -> Path:
    """Where `make-model` puts a size by default: ./models/tinyserve-<size> under the working directory."""
    return Path("models") / f"tinyserve-{size}"


def _corpus(seed: int, num_lines: int = 20000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", ".", "?", "!", ","]))
    return lines


def _train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    return tokenizer


def _random_weights(size: ModelSize, vocab_size: int, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> "torch.Tensor":
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> "torch.Tensor":
        return torch.ones(n, dtype=torch.bfloat16)

    h, d = size.hidden_size, size.head_dim
    weights = {"model.embed_tokens.weight": normal(vocab_size, h), "model.norm.weight": ones(h)}
    for i in range(size.num_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": normal(size.num_heads * d, h),
            p + "self_attn.k_proj.weight": normal(size.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": normal(size.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": normal(h, size.num_heads * d),
            p + "mlp.gate_proj.weight": normal(size.intermediate_size, h),
            p + "mlp.up_proj.weight": normal(size.intermediate_size, h),
            p + "mlp.down_proj.weight": normal(h, size.intermediate_size),
        }
    weights["lm_head.weight"] = normal(vocab_size, h)
    return weights


def make_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a complete Hugging Face model directory (config, safetensors weights, tokenizer, chat template).

    Returns the directory. Idempotent: an existing directory made with the same size and seed is kept.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    spec = MODEL_SIZES[size]
    out = Path(out_dir)
    stamp = {"size": size, "seed": seed, "format": 1}
    stamp_file = out / "tinyserve_model.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(spec.vocab_size, seed)
    vocab_size = tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}

    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
    }, indent=2))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "bos_token_id": ids["<|bos|>"],
        "eos_token_id": [ids["<|eos|>"], ids["<|end|>"]],
        "pad_token_id": ids["<|pad|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|bos|>"], "eos_token_id": [ids["<|eos|>"], ids["<|end|>"]],
    }, indent=2))

    from safetensors.torch import save_file

    save_file(_random_weights(spec, vocab_size, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp_file.write_text(json.dumps(stamp))
    return out
