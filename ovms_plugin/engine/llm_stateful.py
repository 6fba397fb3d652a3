"""LLM engine for devices ContinuousBatchingPipeline does not run on (the NPU): one
stateful LLMPipeline, one request at a time, the rest waiting in order behind it. Same
messages as the continuous-batching engine (engine/llm.py): prompt ids in, new token ids
out per token, so the front end streams both alike.

A prompt longer than the pipeline's MAX_PROMPT_LEN is refused by the front end before it
gets here (the NPU pipeline would otherwise cut it into garbage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from ovms_plugin.engine.llm import apply_request_config, default_kwargs
from ovms_plugin.engine.protocol import StepOutput
from ovms_plugin.engine.queued import QueuedEngine
from ovms_plugin.engine.stats import Histogram

log = logging.getLogger(__name__)


class _Streamer(ov_genai.StreamerBase):
    """Hands each new token to the worker as an output, and stops the generation when the
    request was aborted (checked per token)."""

    def __init__(self, on_tokens: Callable[[list[int]], bool]) -> None:
        super().__init__()
        self.on_tokens = on_tokens

    def write(self, token: Any) -> ov_genai.StreamingStatus:
        ids = [int(token)] if isinstance(token, int) else [int(t) for t in token]
        if self.on_tokens(ids):
            return ov_genai.StreamingStatus.CANCEL
        return ov_genai.StreamingStatus.RUNNING

    def end(self) -> None:
        pass


class StatefulLLMEngine(QueuedEngine):
    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        super().__init__()
        self.device = config.get("device", "CPU")
        started = time.monotonic()
        self.pipe = ov_genai.LLMPipeline(str(model_dir), self.device,
                                         **config.get("properties", {}))
        self.load_seconds = time.monotonic() - started
        self.defaults = default_kwargs(self.pipe.get_generation_config())
        self.requests_total = self.tokens_in_total = self.tokens_out_total = 0
        self.ttft = Histogram()
        self.tpot = Histogram()
        log.info("loaded %s on %s (stateful LLMPipeline) in %.2fs", model_dir, self.device,
                 self.load_seconds)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "engine": "stateful",
                "load_seconds": round(self.load_seconds, 3), "openvino": ov.get_version()}

    def step(self) -> list[StepOutput]:
        req_id, p = self.queue.popleft()
        gc = apply_request_config(ov_genai.GenerationConfig(**self.defaults), p)
        added = time.monotonic()
        first: list[float] = []
        count = [0]

        def on_tokens(ids: list[int]) -> bool:
            if not first:
                first.append(time.monotonic())
                self.ttft.observe(first[0] - added)
            count[0] += len(ids)
            self.emit([StepOutput(req_id, ids)])
            return self.is_interrupted(req_id)

        self.requests_total += 1
        self.tokens_in_total += len(p.ids)
        ids = ov.Tensor(np.asarray([p.ids], dtype=np.int64))
        self.pipe.generate(ids, gc, _Streamer(on_tokens))
        self.tokens_out_total += count[0]
        if self.take_interrupt(req_id):
            return []
        if first and count[0] > 1:
            self.tpot.observe((time.monotonic() - first[0]) / (count[0] - 1))
        finish = "length" if count[0] >= int(p.max_new_tokens) else "stop"
        return [StepOutput(req_id, [], finish)]

    def metrics(self) -> dict[str, Any]:
        return {"running": 1 if self.queue else 0, "waiting": max(0, len(self.queue) - 1),
                "requests_total": self.requests_total,
                "tokens_in_total": self.tokens_in_total,
                "tokens_out_total": self.tokens_out_total,
                "ttft_seconds": self.ttft.snapshot(), "tpot_seconds": self.tpot.snapshot()}
