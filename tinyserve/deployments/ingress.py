"""TinyServe's OpenAI ingress: ray.serve.llm's OpenAiIngress with OpenAI-style errors everywhere.

Ray's ingress answers an unknown model with FastAPI's `{"detail": ...}`; OpenAI clients expect
`{"error": {"message", "type", "param", "code"}}`. This subclass raises the error type the ingress's
exception middleware renders in OpenAI's shape.
"""

from __future__ import annotations

from typing import Optional

from fastapi import HTTPException
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

__all__ = ["TinyServeIngress"]


class TinyServeIngress(OpenAiIngress):
    """OpenAiIngress whose model lookup fails with an OpenAI-style 4xx (never FastAPI's `detail` body)."""

    async def _get_model_id(self, model: Optional[str]) -> str:
        try:
            return await super()._get_model_id(model)
        except HTTPException as exc:
            error_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
            raise OpenAIHTTPException(status_code=exc.status_code, message=str(exc.detail), type=error_type) from None
