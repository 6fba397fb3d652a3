"""LLM engine (runs inside a worker process): openvino_genai's ContinuousBatchingPipeline
driven by add_request / step / can_read / read.

Requests: kinds.llm.LLMRequest (prompt token ids and sampling settings). Per step, for
each request with news: a StepOutput with the new token ids and finish None, "stop" or
"length"; a request that does not fit in the KV cache fails with no_kv_space.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from ovms_plugin.engine.protocol import FailureKind, StepOutput, failed
from ovms_plugin.engine.requests import VISION_MODEL, LLMRequest, LLMSeq
from ovms_plugin.engine.stats import Histogram

log = logging.getLogger(__name__)

_FINISH = {ov_genai.GenerationFinishReason.STOP: "stop",
           ov_genai.GenerationFinishReason.LENGTH: "length"}


@dataclass
class _Running:
    handle: Any
    max_new_tokens: int
    plain: bool = True  # results are bare ids (one sequence, no logprobs); else LLMSeqs
    generated: int = 0
    added: float = field(default_factory=time.monotonic)
    first_token: float | None = None


# Fields of the model's own generation_config.json that a request starts from.
_DEFAULT_FIELDS = ("eos_token_id", "stop_token_ids", "do_sample", "temperature", "top_p",
                   "top_k", "min_p", "repetition_penalty")


def default_kwargs(config: Any) -> dict[str, Any]:
    """GenerationConfig cannot be copied; keep its fields as keyword arguments. Unset
    integers read back as SIZE_MAX, which the constructor refuses: leave those out."""
    out = {}
    for key in _DEFAULT_FIELDS:
        value = getattr(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2**31:
            continue
        out[key] = value
    return out


def apply_request_config(gc: Any, p: LLMRequest) -> Any:
    """A request's sampling settings on top of the model's defaults."""
    gc.max_new_tokens = int(p.max_new_tokens)
    temperature = p.temperature
    if temperature is not None:
        gc.do_sample = temperature > 0
        if temperature > 0:
            gc.temperature = float(temperature)
    if p.top_p is not None and gc.do_sample:
        gc.top_p = float(p.top_p)
    if p.presence_penalty is not None:
        gc.presence_penalty = float(p.presence_penalty)
    if p.frequency_penalty is not None:
        gc.frequency_penalty = float(p.frequency_penalty)
    if p.seed is not None:
        gc.rng_seed = int(p.seed) & 0xFFFFFFFF
    elif gc.do_sample:  # without a seed every sampled request draws its own (GenAI's
        gc.rng_seed = secrets.randbits(32)  # default seed is the same for all of them)
    if p.ignore_eos:
        gc.ignore_eos = True
    if p.top_k is not None:
        gc.top_k = int(p.top_k)
    if p.min_p is not None:
        gc.min_p = float(p.min_p)
    if p.repetition_penalty is not None:
        gc.repetition_penalty = float(p.repetition_penalty)
    if p.min_new_tokens:
        gc.min_new_tokens = int(p.min_new_tokens)
    gc.num_return_sequences = int(p.n)
    if p.logprobs:
        gc.logprobs = 1
    if p.structured is not None:
        what, spec = p.structured
        so = ov_genai.StructuredOutputConfig()
        if what == "json_schema":
            so.json_schema = spec
        elif what == "regex":
            so.regex = spec
        else:
            raise ValueError(f"unknown kind of structured output {what!r}")
        gc.structured_output_config = so
    return gc


# Texts a draft model must tokenize as the model does (GenAI itself compares only the
# length of one sentence's ids and the special tokens).
_TOKENIZER_PROBES = (
    "Could you please tell me something about OpenVINO.GenAI?",
    "Hello, OpenVINO! 1 2 3 — héllo 世界 🙂",
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n",
    "Repeat this text exactly, word for word: the quick brown fox jumps over the lazy dog.",
)


def check_draft_tokenizer(model_dir: Path, draft_dir: Path, draft: str) -> None:
    """Refuses a draft model whose tokens are not the model's: the model checks the draft's
    token ids as its own, so another vocabulary would make it accept wrong proposals or
    waste every step. Compared: the special tokens, the ids of a few texts, and the
    vocabulary size (the draft may not propose ids past the model's)."""
    main, other = ov_genai.Tokenizer(str(model_dir)), ov_genai.Tokenizer(str(draft_dir))
    fix = ("; pick a draft model of the same family, whose tokenizer is the model's "
           "(or leave llm.draft_model out)")
    for what in ("eos", "bos", "pad"):
        mine, theirs = (getattr(t, f"get_{what}_token_id")() for t in (main, other))
        if mine != theirs:
            raise ValueError(f"draft model {draft!r} has another tokenizer: its {what} token "
                             f"id is {theirs}, the model's {mine}{fix}")
    for text in _TOKENIZER_PROBES:
        mine, theirs = (t.encode(text, add_special_tokens=False).input_ids.data[0].tolist()
                        for t in (main, other))
        if mine != theirs:
            raise ValueError(f"draft model {draft!r} has another tokenizer: it splits "
                             f"{text!r} into token ids {theirs[:8]}..., the model into "
                             f"{mine[:8]}...{fix}")
    sizes = [_vocab_size(d) for d in (model_dir, draft_dir)]
    if None not in sizes and sizes[1] > sizes[0]:  # type: ignore[operator]
        raise ValueError(f"draft model {draft!r} has a vocabulary of {sizes[1]} tokens, more "
                         f"than the model's {sizes[0]}: it could propose tokens the model "
                         f"does not have{fix}")


def _vocab_size(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    size = config.get("vocab_size") if isinstance(config, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


class LLMEngine:
    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        sc = ov_genai.SchedulerConfig()
        for key, value in config.get("scheduler", {}).items():
            setattr(sc, key, value)
        self.scheduler = config.get("scheduler", {})
        self.device = config.get("device", "CPU")
        # Speculative decoding, from n-grams of the prompt or from a draft model: every
        # request of such a pipeline must ask for it.
        speculative = config.get("speculative") or {}
        self.lookup: dict[str, int] | None = speculative.get("prompt_lookup")
        self.draft: dict[str, Any] | None = speculative.get("draft")
        properties = dict(config.get("properties", {}))
        if self.lookup:
            properties["prompt_lookup"] = True
        if self.draft:
            check_draft_tokenizer(model_dir, Path(self.draft["path"]), self.draft["model"])
            properties["draft_model"] = ov_genai.draft_model(
                self.draft["path"], self.draft["device"], **self.draft["properties"])
        started = time.monotonic()
        self.pipe = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), sc, self.device, properties)
        self.load_seconds = time.monotonic() - started
        # A vision-language model's folder: the same pipeline takes images with a prompt.
        self.vision = (model_dir / VISION_MODEL).is_file()
        self.defaults = default_kwargs(self.pipe.get_config())
        self.running: dict[int, _Running] = {}
        # Stopped handles stay referenced until the next step: a collected handle is
        # stopped again by OpenVINO, and dropping it mid-step is not needed.
        self._stopped: list[Any] = []
        self.requests_total = 0
        self.tokens_in_total = 0
        self.tokens_out_total = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "aborted": 0, "error": 0}
        self.ttft = Histogram()
        self.tpot = Histogram()
        log.info("loaded %s on %s in %.2fs (scheduler %s)", model_dir, self.device,
                 self.load_seconds, self.scheduler)

    def info(self) -> dict[str, Any]:
        draft = None
        if self.draft:
            draft = {k: v for k, v in self.draft.items() if k in (
                "model", "device", "num_assistant_tokens", "assistant_confidence_threshold")}
        return {"device": self.device, "scheduler": self.scheduler, "prompt_lookup": self.lookup,
                "draft": draft, "vision": self.vision, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version()}

    def add(self, req_id: int, payload: LLMRequest) -> None:
        gc = apply_request_config(ov_genai.GenerationConfig(**self.defaults), payload)
        if self.lookup:
            gc.num_assistant_tokens = int(payload.num_assistant_tokens
                                          or self.lookup["num_assistant_tokens"])
            gc.max_ngram_size = int(payload.max_ngram_size or self.lookup["max_ngram_size"])
        if self.draft:  # a fixed number of proposals or a confidence, the request's first
            threshold = payload.assistant_confidence_threshold
            tokens = payload.num_assistant_tokens
            if threshold is None and tokens is None:
                threshold = self.draft.get("assistant_confidence_threshold")
                tokens = self.draft.get("num_assistant_tokens")
            if threshold is not None:
                gc.assistant_confidence_threshold = float(threshold)
            else:
                gc.num_assistant_tokens = int(tokens)
        if self.vision and payload.images is None:
            raise ValueError("a vision model's requests carry their prompt as text")
        if payload.images is not None:
            if not self.vision:
                raise ValueError("this model takes no images")
            gc.apply_chat_template = False  # the front end rendered the template
            images = [ov.Tensor(np.ascontiguousarray(a, dtype=np.uint8))
                      for a in payload.images]
            handle = self.pipe.add_request(req_id, payload.prompt or "", images, gc)
            self.tokens_in_total += payload.prompt_tokens
        else:
            ids = ov.Tensor(np.asarray([payload.ids], dtype=np.int64))
            handle = self.pipe.add_request(req_id, ids, gc)
            self.tokens_in_total += len(payload.ids)
        self.running[req_id] = _Running(handle, int(payload.max_new_tokens), payload.plain)
        self.requests_total += 1

    def abort(self, req_id: int) -> None:
        run = self.running.pop(req_id, None)
        if run is not None:
            run.handle.stop()
            self._stopped.append(run.handle)
            self.finished["aborted"] += 1

    def has_work(self) -> bool:
        return bool(self.running)

    def step(self) -> list[StepOutput]:
        self.pipe.step()
        self._stopped.clear()
        outs = []
        for req_id, run in list(self.running.items()):
            handle = run.handle
            new: list[int] = []
            finish = None
            # read() blocks (holding the GIL) when nothing is there: only after can_read().
            seqs: list[LLMSeq] = []
            if handle.can_read():
                read = handle.read()
                if run.plain:
                    out = next(iter(read.values()))
                    new = list(out.generated_ids)
                    finish = _FINISH.get(out.finish_reason)
                else:
                    seqs = [(int(i), list(o.generated_ids),
                             [float(x) for x in o.generated_log_probs],
                             _FINISH.get(o.finish_reason)) for i, o in read.items()]
                    new = [t for seq in seqs for t in seq[1]]
                if new and run.first_token is None:
                    run.first_token = time.monotonic()
                    self.ttft.observe(run.first_token - run.added)
                run.generated += len(new)
                self.tokens_out_total += len(new)
            status = handle.get_status()
            if finish is None and status != ov_genai.GenerationStatus.RUNNING:
                if status == ov_genai.GenerationStatus.FINISHED:
                    finish = "length" if run.generated >= run.max_new_tokens else "stop"
                else:  # IGNORED without our stop: it did not fit in the KV cache
                    outs.append(failed(req_id, FailureKind.NO_KV_SPACE,
                                       "the request did not fit in the engine's KV cache; "
                                       "retry, or raise the model's scheduler cache_size"))
                    del self.running[req_id]
                    self.finished["error"] += 1
                    continue
            if new or finish or seqs:
                outs.append(StepOutput(req_id, new if run.plain else seqs, finish))
            if finish:
                del self.running[req_id]
                self.finished[finish] += 1
                if run.first_token is not None and run.generated > 1:
                    self.tpot.observe((time.monotonic() - run.first_token) / (run.generated - 1))
        return outs

    def metrics(self) -> dict[str, Any]:
        """Engine metrics. Preemptions are not exposed by openvino-genai 2026.4."""
        m = self.pipe.get_metrics()
        scheduled = int(m.scheduled_requests)
        return {"running": len(self.running), "scheduled_requests": scheduled,
                "waiting": max(0, len(self.running) - scheduled),
                "requests_total": self.requests_total, "finished": dict(self.finished),
                "tokens_in_total": self.tokens_in_total,
                "tokens_out_total": self.tokens_out_total,
                "cache_usage": m.cache_usage, "max_cache_usage": m.max_cache_usage,
                "kv_cache_bytes": int(m.kv_cache_size_in_bytes),
                "ttft_seconds": self.ttft.snapshot(), "tpot_seconds": self.tpot.snapshot()}
