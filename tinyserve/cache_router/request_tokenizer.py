"""A request's prompt token ids, produced the way the vLLM engine will produce them.

Chat requests: the model's chat template rendered with ``add_generation_prompt`` (default true),
``continue_final_message`` and ``chat_template_kwargs`` from the request; a message's list content keeps
its text parts joined by newlines (vLLM's "string" content format); the rendered text is then tokenized
with ``add_special_tokens`` from the request (default false for chat). Completion requests: a string
prompt is tokenized with special tokens (default true), a list of ints is taken as is. Anything else
(multimodal parts, batches of prompts, prompt embeddings) returns None: the router then routes on load only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RequestTokenizer", "request_fields"]


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def request_fields(request: Any) -> dict[str, Any]:
    """The routing-relevant fields of an OpenAI chat/completion request (pydantic object or dict)."""
    return {
        "messages": _get(request, "messages"),
        "prompt": _get(request, "prompt"),
        "add_generation_prompt": _get(request, "add_generation_prompt", True),
        "continue_final_message": _get(request, "continue_final_message", False),
        "add_special_tokens": _get(request, "add_special_tokens"),
        "chat_template_kwargs": _get(request, "chat_template_kwargs") or {},
        "cache_salt": _get(request, "cache_salt"),
        "user": _get(request, "user"),
        "max_tokens": _get(request, "max_completion_tokens") or _get(request, "max_tokens"),
    }


def _text_content(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = _get(part, "type")
            if kind not in ("text", None):
                return None  # multimodal: not routed by content
            texts.append(_get(part, "text") or "")
        return "\n".join(texts)
    return None


class RequestTokenizer:
    """Owns one Hugging Face tokenizer (the engine's, from the same model directory) and its chat template.

    Invariant: for a supported request, ``token_ids(request)`` equals the engine's ``prompt_token_ids``.
    Not thread-safe across concurrent calls on some tokenizers; the router calls it from one worker thread.

    Args:
        model_dir: the model directory (or hub id) the engine loads its tokenizer from.
        chat_template: an explicit chat template when the deployment overrides the model's.
    """

    def __init__(self, model_dir: str, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.chat_template = chat_template

    def token_ids(self, request: Any) -> list[int] | None:
        f = request_fields(request)
        messages = f["messages"]
        if messages is not None:
            conversation = []
            for m in messages:
                text = _text_content(_get(m, "content"))
                if text is None:
                    return None
                conversation.append({"role": _get(m, "role"), "content": text})
            rendered = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=bool(f["add_generation_prompt"]) and not f["continue_final_message"],
                continue_final_message=bool(f["continue_final_message"]),
                **f["chat_template_kwargs"],
            )
            special = f["add_special_tokens"]
            return self.tokenizer.encode(rendered, add_special_tokens=bool(special) if special is not None else False)
        prompt = f["prompt"]
        if isinstance(prompt, str):
            special = f["add_special_tokens"]
            return self.tokenizer.encode(prompt, add_special_tokens=True if special is None else bool(special))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None
