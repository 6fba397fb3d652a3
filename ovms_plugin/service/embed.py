"""Embeddings and rerank: request parsing and validation, the model's sentence-transformers
configuration, token counting, and the OpenAI / Cohere-style response shapes."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ovms_plugin.service import jsonenc
from ovms_plugin.service.errors import bool_field, int_field, invalid, require_model
from ovms_plugin.store.store import read_json

MAX_INPUTS = 2048


@dataclass
class EmbedRequest:
    model: str
    texts: list[str]
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate: bool | None = None
    input_type: str = "document"  # or "query": picks the instruction prefix


@dataclass
class RerankRequest:
    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    truncate: bool | None = None


def _texts(value: Any, what: str, param: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(f"'{param}' must be a non-empty string or a non-empty list of strings",
                      param)
    if len(value) > MAX_INPUTS:
        raise invalid(f"'{param}' has {len(value)} items; send at most {MAX_INPUTS} per "
                      "request", param)
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise invalid(f"{what} {i} is not a string (token arrays are not supported)",
                          param)
        if not text.strip():
            raise invalid(f"{what} {i} is empty; every {what} needs some text", param)
    return value


def parse_embed(body: Any) -> EmbedRequest:
    model = require_model(body)
    req = EmbedRequest(model=model, texts=_texts(body.get("input"), "input", "input"))
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise invalid(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}",
                      "encoding_format")
    req.encoding_format = fmt
    req.dimensions = int_field(body, "dimensions")
    if body.get("truncate") is not None:
        req.truncate = bool_field(body, "truncate")
    input_type = body.get("input_type") or "document"
    if input_type not in ("document", "query"):
        raise invalid("'input_type' must be 'document' or 'query'", "input_type")
    req.input_type = input_type
    return req


def parse_rerank(body: Any) -> RerankRequest:
    model = require_model(body)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("'query' must be a non-empty string", "query")
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise invalid("'documents' must be a list of strings (or of {\"text\": ...} objects), "
                      f"got {type(docs).__name__}", "documents")
    if isinstance(docs, list):  # Cohere/Jina also accept {"text": ...} objects
        docs = [d.get("text") if isinstance(d, dict) else d for d in docs]
    req = RerankRequest(model=model, query=query,
                        documents=_texts(docs, "document", "documents"))
    req.top_n = int_field(body, "top_n")
    req.return_documents = bool_field(body, "return_documents")
    if body.get("truncate") is not None:
        req.truncate = bool_field(body, "truncate")
    return req


def sentence_transformers_config(folder: Path) -> dict[str, Any]:
    """Pooling, normalisation and maximum length from the model's own sentence-transformers
    files (modules.json, <n>_Pooling/config.json, a Normalize module,
    sentence_bert_config.json); empty when the model has none."""
    modules = read_json_list(folder / "modules.json")
    out: dict[str, Any] = {}
    if modules:
        out["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                pooling = read_json(folder / m.get("path", "1_Pooling") / "config.json")
                if pooling.get("pooling_mode_cls_token"):
                    out["pooling"] = "cls"
                elif pooling.get("pooling_mode_lasttoken"):
                    out["pooling"] = "last_token"
                elif pooling.get("pooling_mode_mean_tokens", True):
                    out["pooling"] = "mean"
    max_len = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(max_len, int):
        out["max_length"] = max_len
    return out


def read_json_list(path: Path) -> list[dict[str, Any]]:
    import json
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def check_lengths(counts: list[int], limit: int | None, truncate: bool, what: str) -> None:
    if limit is None or truncate:
        return
    for i, n in enumerate(counts):
        if n > limit:
            raise invalid(f"{what} {i} has {n} tokens, but the model takes at most {limit}; "
                          "shorten it, or send \"truncate\": true to cut it to the limit",
                          "input")


def embedding_response(req: EmbedRequest, vectors: np.ndarray, prompt_tokens: int
                       ) -> dict[str, Any]:
    if req.dimensions is not None:
        dim = vectors.shape[1]
        if req.dimensions > dim:
            raise invalid(f"'dimensions' {req.dimensions} exceeds the model's {dim}",
                          "dimensions")
        vectors = vectors[:, :req.dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1, norms)  # truncated vectors, re-normalised
    data = []
    for i, vec in enumerate(vectors):
        if req.encoding_format == "base64":
            emb: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode()
        else:
            emb = jsonenc.floats(vec)
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def rerank_response(req: RerankRequest, scores: list[tuple[int, float]], tokens: int
                    ) -> dict[str, Any]:
    ranked = sorted(scores, key=lambda s: -s[1])
    if req.top_n is not None:
        ranked = ranked[:req.top_n]
    results = []
    for index, score in ranked:
        item: dict[str, Any] = {"index": index, "relevance_score": score}
        if req.return_documents:
            item["document"] = {"text": req.documents[index]}
        results.append(item)
    return {"id": "rerank-" + uuid.uuid4().hex[:24], "results": results, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
