"""The requests and results each kind's engine takes and gives, as they cross the worker
boundary (the kinds re-export their own: kinds/llm.py's LLMRequest, ...). They live here,
beside the engines, so that engines import no kind module (kinds import their engines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# kinds/llm.py
@dataclass(slots=True)
class LLMRequest:
    """What the front end sends an LLM engine (both variants): the prompt's token ids and
    the sampling settings. Its step outputs' results are the new token ids."""

    ids: list[int]
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False


# kinds/embed.py
@dataclass(slots=True)
class EmbedJob:
    """Texts to embed; `limit` tokens per text (None: the engine's max_length); over it,
    cut when `truncate`, else refused with the counts alone."""

    texts: list[str]
    limit: int | None = None
    truncate: bool = False


# kinds/embed.py
@dataclass(slots=True)
class EmbedResult:
    vectors: Any  # float32 [n, dim]; None when refused (a text over the limit)
    counts: list[int]  # tokens per text


# kinds/rerank.py
@dataclass(slots=True)
class RerankJob:
    """A query and its documents. The result: [(document index, score), ...]."""

    query: str
    documents: list[str]


# kinds/image.py
@dataclass(slots=True)
class ImageJob:
    """One text-to-image request, resolved against the model (service/image.py)."""

    prompt: str
    width: int
    height: int
    steps: int
    n: int = 1
    seed: int = 42
    guidance_scale: float | None = None
    negative_prompt: str | None = None


# kinds/image.py
@dataclass(slots=True)
class ImageProgress:
    step: int  # denoising steps done
    steps: int


# kinds/image.py
@dataclass(slots=True)
class ImageResult:
    images: list[bytes]  # PNGs
