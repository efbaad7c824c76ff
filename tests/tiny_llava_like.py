"""Tiny LLaVA-like VLM families of issue 18 (llava_next, llava_onevision, mistral3, internvl, smolvlm): random-weight models built from config objects, for the shared tests
(tests/conftest.py registers them). Each builder takes the decoder's block count and returns
(model in eval mode, processor or tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {}
MULTIMODAL: frozenset[str] = frozenset()
IMAGE_TOKENS: dict[str, int] = {}  # image tokens per 16x16 test image, per multimodal family
