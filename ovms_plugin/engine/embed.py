"""Embedding and rerank engines (run inside a worker process).

Embeddings: a dynamic batcher over openvino_genai's TextEmbeddingPipeline. Texts of many
requests queue up while a batch runs; the next step takes up to `max_batch_size` of them
(waiting at most `max_wait_ms` for more when the batch is not full), grouped by length so
padding stays small, and splits the vectors back to their requests. A request with many
texts spans several batches.
  payload: {"texts": [str, ...]}  ->  result: float32 array [n, dim] (one output, "stop")

Rerank: TextRerankPipeline, one request (query + documents) per step.
  payload: {"query": str, "documents": [str, ...]}  ->  result: [(index, score), ...]
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

log = logging.getLogger(__name__)

_POOLING = {"cls": "CLS", "mean": "MEAN", "last_token": "LAST_TOKEN"}


@dataclass
class _Pending:
    vectors: list[Any]
    left: int
    arrived: float = field(default_factory=time.monotonic)


class EmbedEngine:
    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        opts = config.get("embed", {})
        cfg = ov_genai.TextEmbeddingPipeline.Config()
        cfg.pooling_type = getattr(ov_genai.TextEmbeddingPipeline.PoolingType,
                                   _POOLING[opts.get("pooling", "mean")])
        cfg.normalize = bool(opts.get("normalize", True))
        if opts.get("max_length"):
            cfg.max_length = int(opts["max_length"])
        self.max_batch = int(opts.get("max_batch_size", 16))
        # Static shapes (the NPU compiles only those): every batch is exactly max_batch
        # texts of max_length tokens; short batches are filled with placeholder texts.
        self.static = bool(opts.get("static_shapes", False))
        if self.static:
            cfg.batch_size = self.max_batch
            cfg.pad_to_max_length = True
            cfg.max_length = int(opts.get("max_length") or 256)
        self.device = config.get("device", "CPU")
        started = time.monotonic()
        self.pipe = ov_genai.TextEmbeddingPipeline(str(model_dir), self.device, cfg,
                                                   **config.get("properties", {}))
        self.load_seconds = time.monotonic() - started
        self.max_wait = float(opts.get("max_wait_ms", 2)) / 1000
        self.queue: deque[tuple[int, int, str]] = deque()  # (req_id, index, text)
        self.pending: dict[int, _Pending] = {}
        self.batch_sizes: Counter[int] = Counter()
        self.texts_total = 0
        log.info("loaded %s on %s in %.2fs (pooling %s, normalize %s, batch <= %d, wait "
                 "<= %.1f ms)", model_dir, self.device, self.load_seconds,
                 opts.get("pooling", "mean"), cfg.normalize, self.max_batch,
                 self.max_wait * 1000)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "max_batch_size": self.max_batch, "max_wait_ms": self.max_wait * 1000,
                "static_shapes": self.static,
                "openvino": ov.get_version()}

    def add(self, req_id: int, payload: dict[str, Any]) -> None:
        texts = payload["texts"]
        self.pending[req_id] = _Pending([None] * len(texts), len(texts))
        self.queue.extend((req_id, i, t) for i, t in enumerate(texts))

    def abort(self, req_id: int) -> None:
        if self.pending.pop(req_id, None) is not None:
            self.queue = deque(item for item in self.queue if item[0] != req_id)

    def has_work(self) -> bool:
        return bool(self.queue)

    def _take_batch(self) -> list[tuple[int, int, str]]:
        # Look a few batches ahead and take the shortest texts together: padding is to the
        # longest text of a batch. The rest keeps its place at the front of the queue.
        window = [self.queue.popleft() for _ in range(min(len(self.queue), 4 * self.max_batch))]
        window.sort(key=lambda item: len(item[2]))
        batch, rest = window[:self.max_batch], window[self.max_batch:]
        self.queue.extendleft(reversed(rest))
        return batch

    def step(self) -> list[tuple]:
        if len(self.queue) < self.max_batch:
            oldest = min(self.pending[r].arrived for r, _, _ in self.queue)
            if time.monotonic() - oldest < self.max_wait:
                time.sleep(0.0005)  # the worker loop takes new messages, then steps again
                return []
        batch = self._take_batch()
        texts = [text for _, _, text in batch]
        if self.static:
            texts += ["."] * (self.max_batch - len(texts))
        vectors = self.pipe.embed_documents(texts)[:len(batch)]
        self.batch_sizes[len(batch)] += 1
        self.texts_total += len(batch)
        outs = []
        for (req_id, index, _), vec in zip(batch, vectors, strict=True):
            p = self.pending.get(req_id)
            if p is None:
                continue
            p.vectors[index] = vec
            p.left -= 1
            if p.left == 0:
                del self.pending[req_id]
                outs.append((req_id, np.asarray(p.vectors, dtype=np.float32), "stop", None))
        return outs

    def metrics(self) -> dict[str, Any]:
        batches = sum(self.batch_sizes.values())
        return {"queued_texts": len(self.queue), "requests_waiting": len(self.pending),
                "batches_total": batches, "texts_total": self.texts_total,
                "max_batch_size_seen": max(self.batch_sizes, default=0),
                "mean_batch_size": round(self.texts_total / batches, 2) if batches else 0,
                "batch_sizes": dict(self.batch_sizes)}


class RerankEngine:
    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        cfg = ov_genai.TextRerankPipeline.Config()
        opts = config.get("rerank", {})
        if opts.get("max_length"):
            cfg.max_length = int(opts["max_length"])
        cfg.top_n = 1 << 20  # all documents: the front end applies top_n
        self.device = config.get("device", "CPU")
        started = time.monotonic()
        self.pipe = ov_genai.TextRerankPipeline(str(model_dir), self.device, cfg,
                                                **config.get("properties", {}))
        self.load_seconds = time.monotonic() - started
        self.queue: deque[tuple[int, dict[str, Any]]] = deque()
        self.requests_total = 0
        log.info("loaded %s on %s in %.2fs", model_dir, self.device, self.load_seconds)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version()}

    def add(self, req_id: int, payload: dict[str, Any]) -> None:
        self.queue.append((req_id, payload))

    def abort(self, req_id: int) -> None:
        self.queue = deque(item for item in self.queue if item[0] != req_id)

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[tuple]:
        req_id, p = self.queue.popleft()
        scores = self.pipe.rerank(p["query"], p["documents"])
        self.requests_total += 1
        return [(req_id, [(int(i), float(s)) for i, s in scores], "stop", None)]

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "requests_total": self.requests_total}
