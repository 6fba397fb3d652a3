"""Embedding and rerank engines (run inside a worker process).

Embeddings: a dynamic batcher over the model's IR. Texts of many requests queue up; whenever
one of the compiled model's infer requests is idle, the batcher takes up to
`max_batch_size` texts (waiting at most `max_wait_ms` for more while the batch is not
full), grouped by length so padding stays small, and starts them on it; finished vectors
go back to their requests. A request with many texts spans several batches.

Why not TextEmbeddingPipeline: it owns one infer request, so one batch runs at a time with
all cores working on it in lockstep. Compiled with the THROUGHPUT hint, the CPU runs one
stream per core instead, each batch on its own stream: measured on 2 cores, 5 % faster
alone and 12 % faster when other processes (the front end, clients) take some CPU, because
a preempted stream no longer stalls the other core (benchmarks/README.md). Tokenization is
openvino_genai's Tokenizer; pooling (CLS, mean, last token) and L2 normalisation follow
sentence-transformers and are checked against TextEmbeddingPipeline by the tests.
  request: kinds.embed.EmbedJob (texts, limit, truncate)
  -> result: kinds.embed.EmbedResult (vectors float32 [n, dim], token counts per text), one
  output, "stop"; over the limit without truncate: the counts alone, nothing run.

Rerank: TextRerankPipeline, one request (query + documents) per step.
  request: kinds.rerank.RerankJob  ->  result: [(document index, score), ...]
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from ovms_plugin.engine.protocol import StepOutput
from ovms_plugin.engine.requests import EmbedJob, EmbedResult, RerankJob

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "last_token")
_Text = tuple[int, int, np.ndarray]  # (request id, index in the request, token ids)


@dataclass
class _Pending:
    vectors: list[Any]
    left: int
    counts: list[int]
    arrived: float = field(default_factory=time.monotonic)


def pool(hidden: np.ndarray, mask: np.ndarray, how: str, normalize: bool) -> np.ndarray:
    """Sentence vectors from token states [batch, tokens, dim] and the attention mask
    [batch, tokens], whichever side the padding is on."""
    if hidden.ndim == 2:  # the model pools in its graph
        out = hidden.astype(np.float32)
    elif how == "cls":
        out = hidden[np.arange(len(hidden)), mask.argmax(axis=1)]
    elif how == "last_token":
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        out = hidden[np.arange(len(hidden)), last]
    else:
        weights = mask[..., None].astype(np.float32)
        out = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    out = np.asarray(out, dtype=np.float32)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


class EmbedEngine:
    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        opts = config.get("embed", {})
        self.pooling = opts.get("pooling", "mean")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        self.normalize = bool(opts.get("normalize", True))
        self.max_batch = int(opts.get("max_batch_size", 8))
        self.max_wait = float(opts.get("max_wait_ms", 2)) / 1000
        self.max_length = int(opts["max_length"]) if opts.get("max_length") else None
        # Static shapes (the NPU compiles only those): every batch is exactly max_batch
        # texts of max_length tokens; short batches are filled with one-token placeholder rows.
        self.static = bool(opts.get("static_shapes", False))
        if self.static:
            self.max_length = self.max_length or 256
        self.device = config.get("device", "CPU")
        started = time.monotonic()
        # One thread: OpenVINO's thread pool doubles what a small encode costs.
        self.tokenizer = ov_genai.Tokenizer(str(model_dir), INFERENCE_NUM_THREADS=1)
        self.pad_id = max(0, int(self.tokenizer.get_pad_token_id()))
        core = ov.Core()
        model = core.read_model(model_dir / "openvino_model.xml")
        self.input_names = {i.get_any_name() for i in model.inputs}
        if self.static:
            model.reshape({name: ov.PartialShape([self.max_batch, self.max_length])
                           for name in self.input_names})
        props = {"PERFORMANCE_HINT": "THROUGHPUT", **config.get("properties", {})}
        self.compiled = core.compile_model(model, self.device, props)
        n = int(opts.get("parallel_batches") or
                self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(max(1, n))]
        self.done: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot, req in enumerate(self.requests):
            req.set_callback(self._finished, slot)
        self.idle = list(range(len(self.requests)))
        self.running: dict[int, tuple[list[_Text], np.ndarray]] = {}
        self.load_seconds = time.monotonic() - started
        self.queue: deque[_Text] = deque()
        self.pending: dict[int, _Pending] = {}
        self.arrived: list[tuple[int, EmbedJob]] = []  # not tokenized yet
        self.finished: list[StepOutput] = []  # answered without running (refused inputs)
        self.batch_sizes: Counter[int] = Counter()
        self.texts_total = 0
        log.info("loaded %s on %s in %.2fs (pooling %s, normalize %s, batch <= %d, wait "
                 "<= %.1f ms, %d batches in parallel)", model_dir, self.device,
                 self.load_seconds, self.pooling, self.normalize, self.max_batch,
                 self.max_wait * 1000, len(self.requests))

    def _finished(self, slot: int) -> None:  # OpenVINO's thread: hand over, nothing more
        self.done.put(slot)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "max_batch_size": self.max_batch, "max_wait_ms": self.max_wait * 1000,
                "static_shapes": self.static, "parallel_batches": len(self.requests),
                "openvino": ov.get_version()}

    def add(self, req_id: int, payload: EmbedJob) -> None:
        self.arrived.append((req_id, payload))

    def _tokenize_arrived(self) -> None:
        """Tokenizes what arrived since the last step in one call (one call per text costs
        ten times the CPU). The counts are the requests' usage and length check (the front
        end does not tokenize again), and the batcher groups texts by them."""
        arrived, self.arrived = self.arrived, []
        texts = [t for _, payload in arrived for t in payload.texts]
        tokens = self.tokenizer.encode(texts)
        ids, mask = tokens.input_ids.data, tokens.attention_mask.data.astype(bool)
        start = 0
        for req_id, payload in arrived:
            n = len(payload.texts)
            rows = [ids[i][mask[i]] for i in range(start, start + n)]
            start += n
            counts = [len(r) for r in rows]
            limit = payload.limit or self.max_length
            if limit and max(counts) > limit:
                if not payload.truncate:  # refused: the front end names the culprit
                    self.finished.append(StepOutput(req_id, EmbedResult(None, counts),
                                                    "stop"))
                    continue
                for i in (i for i, c in enumerate(counts) if c > limit):
                    cut = self.tokenizer.encode([payload.texts[i]], max_length=limit,
                                                truncation=True)
                    rows[i] = cut.input_ids.data[0][cut.attention_mask.data[0].astype(bool)]
            self.pending[req_id] = _Pending([None] * n, n, counts)
            self.queue.extend((req_id, i, row) for i, row in enumerate(rows))

    def abort(self, req_id: int) -> None:
        self.arrived = [item for item in self.arrived if item[0] != req_id]
        if self.pending.pop(req_id, None) is not None:
            self.queue = deque(item for item in self.queue if item[0] != req_id)

    def has_work(self) -> bool:
        return bool(self.arrived or self.queue or self.running or self.finished)

    def _take_batch(self) -> list[_Text]:
        """The batch that wastes least on padding (every text is padded to the longest in its
        batch) among those holding the oldest queued text, so nothing waits for ever. Its
        size spreads what is queued over the idle infer requests, up to max_batch_size.
        Measured with 64 clients sending texts of 5 to 93 tokens: padding fell from 63 % to
        7 % of the real tokens, against taking the shortest texts of the queue."""
        # The oldest texts only: a request may bring thousands, and this runs per batch.
        items = [self.queue.popleft() for _ in range(min(len(self.queue), 32 * self.max_batch))]
        size = min(self.max_batch, -(-(len(items) + len(self.queue)) // len(self.idle)))
        order = sorted(range(len(items)), key=lambda i: len(items[i][2]))
        lengths = [len(items[i][2]) for i in order]
        sums = np.concatenate([[0], np.cumsum(lengths)])
        oldest = order.index(0)  # the deque keeps arrival order
        first = min(range(max(0, oldest - size + 1), min(oldest, len(items) - size) + 1),
                    key=lambda i: lengths[i + size - 1] * size - (sums[i + size] - sums[i]))
        chosen = set(order[first:first + size])
        self.queue.extendleft(reversed([item for i, item in enumerate(items) if i not in chosen]))
        return [items[i] for i in sorted(chosen)]

    def _batch_ready(self) -> bool:
        if len(self.queue) >= self.max_batch:
            return True
        return time.monotonic() - self.pending[self.queue[0][0]].arrived >= self.max_wait

    def _start(self, batch: list[_Text]) -> None:
        rows = [ids for _, _, ids in batch]
        if self.static:  # placeholder rows of one padding token fill the fixed batch
            rows += [np.array([self.pad_id])] * (self.max_batch - len(rows))
        width = self.max_length if self.static else max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):  # right padding: real tokens keep positions 0..n-1
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            inputs["token_type_ids"] = np.zeros_like(ids)
        if "position_ids" in self.input_names:
            inputs["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        slot = self.idle.pop()
        self.running[slot] = (batch, mask)
        self.requests[slot].start_async({k: v for k, v in inputs.items()
                                         if k in self.input_names})

    def _start_ready(self) -> None:
        while self.idle and self.queue and self._batch_ready():
            self._start(self._take_batch())

    def step(self) -> list[StepOutput]:
        if self.arrived:
            self._tokenize_arrived()
        if self.finished:
            outs, self.finished = self.finished, []
            return outs
        self._start_ready()
        if not self.running:
            time.sleep(0.0005)  # the worker loop takes new messages, then steps again
            return []
        try:
            # With every infer request busy nothing can start, so wait for a batch; with
            # one idle, look up shortly for new texts that could run on it.
            slot = self.done.get(timeout=None if not self.idle else 0.001)
        except queue.Empty:
            return []
        outs = []
        while True:
            outs += self._collect(slot)
            try:
                slot = self.done.get_nowait()
            except queue.Empty:
                break
        self._start_ready()
        return outs

    def _collect(self, slot: int) -> list[StepOutput]:
        batch, mask = self.running.pop(slot)
        self.idle.append(slot)
        hidden = self.requests[slot].get_output_tensor(0).data
        vectors = pool(hidden, mask, self.pooling, self.normalize)[:len(batch)]
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
                outs.append(StepOutput(req_id, EmbedResult(
                    np.asarray(p.vectors, dtype=np.float32), p.counts), "stop"))
        return outs

    def metrics(self) -> dict[str, Any]:
        batches = sum(self.batch_sizes.values())
        return {"queued_texts": len(self.queue), "requests_waiting": len(self.pending),
                "batches_running": len(self.running),
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
        self.queue: deque[tuple[int, RerankJob]] = deque()
        self.requests_total = 0
        log.info("loaded %s on %s in %.2fs", model_dir, self.device, self.load_seconds)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version()}

    def add(self, req_id: int, payload: RerankJob) -> None:
        self.queue.append((req_id, payload))

    def abort(self, req_id: int) -> None:
        self.queue = deque(item for item in self.queue if item[0] != req_id)

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[StepOutput]:
        req_id, p = self.queue.popleft()
        scores = self.pipe.rerank(p.query, p.documents)
        self.requests_total += 1
        return [StepOutput(req_id, [(int(i), float(s)) for i, s in scores], "stop")]

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "requests_total": self.requests_total}
