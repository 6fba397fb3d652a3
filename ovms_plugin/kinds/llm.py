"""LLMs: chat and generate on OpenVINO GenAI's continuous-batching pipeline (engine/llm.py).
On the NPU, or with `engine: stateful`, the same models run on the stateful LLMPipeline
variant (kinds/llm_stateful.py), decided here once per device.

The front end renders the chat template, tokenizes, detokenizes and applies stop strings
(Runtime.text); these handlers turn request bodies into TextRequests and text deltas into
OpenAI objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin import settings as settings_mod
from ovms_plugin.engine.requests import VISION_MODEL, LLMRequest  # noqa: F401 (LLMRequest: this kind's)
from ovms_plugin.kinds import llm_kv
from ovms_plugin.kinds.base import Kind, Service, StreamChunk, ValidationError
from ovms_plugin.service import detok, generation, text, tools
from ovms_plugin.store.store import read_json

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import LoadedModel, Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry

log = logging.getLogger(__name__)

SAMPLE = "Hello, OpenVINO! 1 2 3 — héllo 世界"
SMALL_MODEL_BYTES = 2**30  # weights up to this compute in f32 on CPU (compile_properties)
DEFAULT_MODEL = "smollm2-135m-instruct"


async def text_unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    req = text.parse(service, body)
    rid = text.new_id(service)
    choices, prompt_tokens, completion_tokens = await text.collect(generation.generate(rt, req))
    return text.completion(req, rid, choices, prompt_tokens, completion_tokens)


async def text_stream(rt: Runtime, service: str, body: Any) -> AsyncIterator[StreamChunk]:
    """OpenAI's chunks: each choice's deltas (its first with the role), its finish in a
    chunk of its own, and the usage in a last chunk with no choices when
    stream_options.include_usage asks for it."""
    req = text.parse(service, body)
    rid, created = text.new_id(service), int(time.time())
    started: set[int] = set()
    sent = dict.fromkeys(range(req.n), 0)  # characters per choice (completions' offsets)
    ended = 0
    async with aclosing(generation.generate(rt, req)) as deltas:
        async for d in deltas:
            first = d.index not in started
            started.add(d.index)
            body_ = d.text or d.reasoning or d.tool_calls or d.logprobs
            if d.finish_reason is None or body_ or first:
                yield StreamChunk(text.chunk(req, rid, created, d, None, first,
                                             offset=sent[d.index]))
                sent[d.index] += len(d.text)
            if d.finish_reason is None:
                continue
            ended += 1
            last = ended == req.n
            yield StreamChunk(text.chunk(req, rid, created, text.TextDelta("", index=d.index),
                                         d.finish_reason), final=last and not req.include_usage)
            if last and req.include_usage:
                usage = text.usage(d.prompt_tokens, d.completion_tokens)
                yield StreamChunk(text.usage_chunk(req, rid, created, usage), final=True)


def _is_vlm(config: dict[str, Any]) -> bool:
    """A vision-language model's config.json: a vision tower beside the language model."""
    archs = config.get("architectures") or []
    return isinstance(config.get("vision_config"), dict) and any(
        a.endswith("ForConditionalGeneration") for a in archs)


def _validate_text_model(folder: Path, model_type: str | None) -> dict[str, Any]:
    import openvino_genai as ov_genai
    tok = ov_genai.Tokenizer(str(folder))
    ids = tok.encode(SAMPLE, add_special_tokens=False).input_ids.data[0].tolist()
    back = tok.decode(ids)
    if back != SAMPLE:
        raise ValidationError(f"the tokenizer does not round-trip text: {SAMPLE!r} came "
                              f"back as {back!r}")
    template = ""
    try:
        template = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True)
    except Exception as e:
        if model_type == "chat":
            raise ValidationError(f"the chat template does not render: {e}") from None
    if model_type == "chat" and "hi" not in template:
        raise ValidationError("the model has no chat template; pull it as "
                              "model_type 'generate', or pick an instruct/chat model")
    if (folder / "openvino_vision_embeddings_model.xml").is_file():
        # A VLM: one small image through the pipeline that serves it.
        import numpy as np
        import openvino as ov
        pipe = ov_genai.VLMPipeline(str(folder), "CPU")
        pipe.generate("Hello", images=[ov.Tensor(np.full((32, 32, 3), 128, np.uint8))],
                      max_new_tokens=1)
        return {"chat_template": bool(template), "vision": True}
    if not (folder / "openvino_model.xml").is_file():
        raise ValidationError("the folder has no openvino_model.xml (nor a vision-language "
                              "model's openvino_language_model.xml)")
    pipe = ov_genai.LLMPipeline(str(folder), "CPU")
    pipe.generate("Hello", max_new_tokens=1)
    return {"chat_template": bool(template)}


def export_llm_metrics(out: Exposition, model: dict[str, Any], m: dict[str, Any]) -> None:
    out.gauge("llm_requests_running", "Requests the LLM engine is generating for.", model,
              m.get("running"))
    out.gauge("llm_requests_waiting", "Requests added but not yet scheduled.", model,
              m.get("waiting"))
    out.counter("llm_requests_total", "Requests added to the LLM engine.", model,
                m.get("requests_total"))
    for reason, n in sorted((m.get("finished") or {}).items()):
        out.counter("llm_requests_finished_total", "Finished requests, by reason.",
                    {**model, "reason": reason}, n)
    out.counter("llm_prompt_tokens_total", "Prompt tokens prefilled.", model,
                m.get("tokens_in_total"))
    out.counter("llm_generated_tokens_total", "Tokens generated.", model,
                m.get("tokens_out_total"))
    out.gauge("llm_kv_cache_usage_percent", "KV cache in use at the last step, in percent.",
              model, m.get("cache_usage"))
    out.gauge("llm_kv_cache_bytes", "Size of the KV cache.", model, m.get("kv_cache_bytes"))
    out.hist("llm_time_to_first_token_seconds", "Time from request to its first token.",
             model, m.get("ttft_seconds"))
    out.hist("llm_time_per_output_token_seconds",
             "Mean time per generated token after the first, per request.", model,
             m.get("tpot_seconds"))


def _probability(value: Any) -> float:
    """A number above 0 and at most 1 (ValueError("must ...") otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"must be a number above 0 and at most 1, like 0.4; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LLMOptions:
    """settings.yaml's `llm:` section (globally or in a model's), for both LLM engines."""

    npu_max_prompt_len: int = settings_mod.option(
        1024, "NPU: the longest prompt in tokens, compiled in", minimum=1)
    npu_min_response_len: int = settings_mod.option(
        128, "NPU: the tokens kept for the answer, compiled in", minimum=1)
    max_prompt_len: int | None = settings_mod.option(
        None, "the stateful engine off the NPU: refuse longer prompts (default: no limit)",
        minimum=1)
    context_length: int | None = settings_mod.option(
        None, "tokens one request may hold, prompt and answer (default: the model's own)",
        minimum=llm_kv.MIN_CONTEXT)
    parallel: int = settings_mod.option(
        4, "full-length requests the KV cache is sized for (short ones share it)",
        minimum=1)
    prompt_lookup: bool = settings_mod.option(
        False, "speculative decoding from n-grams of the prompt (faster answers that copy "
        "from it; n > 1 is refused)")
    prompt_lookup_tokens: int = settings_mod.option(
        5, "prompt lookup: tokens proposed per step (a request's num_assistant_tokens)",
        minimum=1)
    prompt_lookup_ngram: int = settings_mod.option(
        3, "prompt lookup: longest n-gram matched (a request's max_ngram_size)", minimum=1)
    draft_model: str | None = settings_mod.option(
        None, "speculative decoding with a draft model: the name of an installed LLM with "
        "the same tokenizer, smaller and faster than this one (n > 1 is refused)")
    draft_device: str | None = settings_mod.option(
        None, "draft model: the device it runs on (default: the model's)")
    draft_tokens: int = settings_mod.option(
        5, "draft model: tokens proposed per step (a request's num_assistant_tokens)",
        minimum=1)
    draft_confidence_threshold: float | None = settings_mod.option(
        None, "draft model: propose tokens while the draft's probability of each stays "
        "above this, instead of draft_tokens (a request's assistant_confidence_threshold)",
        parse=_probability)
    tool_parser: str | None = settings_mod.option(
        None, "how the model writes tool calls (default: recognised from its chat template)",
        choices=(None, *sorted(tools.PARSERS)))
    max_images: int = settings_mod.option(
        8, "vision models: images per request", minimum=1)
    max_image_bytes: int = settings_mod.option(
        20 * 2**20, "vision models: bytes per image, encoded", minimum=1)
    max_image_pixels: int = settings_mod.option(
        4096 * 4096, "vision models: pixels per image (width x height)", minimum=1)
    allow_local_images: bool = settings_mod.option(
        False, "vision models: image URLs may be paths of files on this machine")
    allow_remote_images: bool = settings_mod.option(
        False, "vision models: the server fetches http(s) image URLs (off: a local server "
               "does not fetch what a prompt names)")


class LLMKind(Kind):
    name = "llm"
    task = "text-generation"
    services = (
        Service("chat", text_unary, text_stream, task_type="text-generation", timeout=-1,
                default_model=DEFAULT_MODEL, stream_usage=True),
        Service("generate", text_unary, text_stream, task_type="text-generation",
                timeout=-1, default_model=DEFAULT_MODEL, stream_usage=True),
    )
    # The model's own IR is openvino_model.xml, or a VLM's openvino_language_model.xml
    # with its vision and text-embedding models: validate() loads whichever it is.
    required_files = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")
    export_task = "text-generation-with-past"
    needs_tokenizer = True  # chat templates and prompt ids
    options_section = "llm"
    options_type = LLMOptions
    device_preference = ("GPU.discrete", "GPU.integrated", "CPU")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        archs = config.get("architectures") or []
        if "openvino_detokenizer.xml" in files or any(
                a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or \
                _is_vlm(config):
            return 30
        return None

    def is_native(self, files: set[str]) -> bool:
        return "openvino_model.xml" in files or "openvino_language_model.xml" in files

    def export_task_for(self, src: Path) -> str:
        return "image-text-to-text" if _is_vlm(read_json(src / "config.json")) \
            else "text-generation-with-past"

    def default_weight_format(self, n_params: int) -> str:
        """int4 for LLMs over 1B parameters, int8 for smaller ones."""
        return "int4" if n_params > 10**9 else "int8"

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        return _validate_text_model(folder, model_type)

    def engine_for(self, device: str, ms: ModelSettings) -> Kind:
        """ContinuousBatchingPipeline does not run on the NPU: LLMs there (and anywhere
        with `engine: stateful`) run through LLMPipeline's stateful path."""
        from ovms_plugin.kinds.registry import get
        if device.split(".")[0] == "NPU" or ms.engine == "stateful":
            return get("llm_stateful")
        return self

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.llm import LLMEngine
        return LLMEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        """The scheduler, with a KV cache sized from the model (kinds/llm_kv.py) unless
        the settings give its size."""
        scheduler = settings_mod.scheduler_config(device, ms, entry.size, budget_left)
        given = ms.options.get("llm", {})
        opts = LLMOptions(**given)
        if not opts.prompt_lookup and {"prompt_lookup_tokens", "prompt_lookup_ngram"} & set(
                given):
            raise settings_mod.SettingsError(
                f"model {entry.name!r}: llm.prompt_lookup_tokens and prompt_lookup_ngram "
                "tune prompt lookup, which is off; set llm.prompt_lookup: true, or leave "
                "them out")
        sized = "cache_size" in ms.scheduler or "num_kv_blocks" in ms.scheduler
        if sized and "parallel" in given:
            raise settings_mod.SettingsError(
                f"model {entry.name!r}: llm.parallel sizes the KV cache, which "
                "scheduler.cache_size / num_kv_blocks already set; leave one of them out")
        extra: dict[str, Any] = {}
        if opts.prompt_lookup:
            extra["speculative"] = {"prompt_lookup": {
                "num_assistant_tokens": opts.prompt_lookup_tokens,
                "max_ngram_size": opts.prompt_lookup_ngram}}
        draft = self._draft(entry, device, ms, opts, set(given))
        draft_bpt = 0
        if draft is not None:
            extra["speculative"] = {"draft": draft}
            shape = llm_kv.model_shape(Path(draft["path"]))
            try:
                precision = llm_kv.precision_of(draft["properties"], draft["device"])
            except llm_kv.KVSizeError as e:
                raise settings_mod.SettingsError(f"model {entry.name!r}: draft model: {e}") \
                    from None
            draft_bpt = llm_kv.bytes_per_token(shape, precision) if shape else 0
        family = device.split(".")[0]
        if sized:
            if draft is not None and scheduler.get("num_kv_blocks"):  # as many as the model's
                draft["kv_bytes"] = draft_bpt * int(scheduler["num_kv_blocks"]) * \
                    llm_kv.BLOCK_TOKENS.get(family, 16)
            return {"scheduler": scheduler, **extra}
        room = max(0, min(settings_mod.available_memory_bytes(), budget_left)
                   - 2 * entry.size) // 2
        if draft is not None:  # its weights, and its cache beside the model's (see _draft)
            room = max(0, room - draft["weights_bytes"])
        try:
            kv = llm_kv.plan(entry.path, family, {**self.compile_properties(family, {}),
                                                  **ms.properties},
                             context=opts.context_length, parallel=opts.parallel,
                             room_bytes=room, extra_bytes_per_token=draft_bpt)
        except llm_kv.KVSizeError as e:
            raise settings_mod.SettingsError(f"model {entry.name!r}: {e}") from None
        if kv is None:  # config.json does not give the shape: a bounded cache by memory
            return {"scheduler": scheduler, **extra}
        scheduler.pop("cache_size", None)
        scheduler["num_kv_blocks"] = kv.blocks
        if draft is not None:
            draft["kv_bytes"] = draft_bpt * kv.tokens
        return {"scheduler": scheduler, "kv": kv.as_dict(), **extra}

    def _draft(self, entry: ModelEntry, device: str, ms: ModelSettings, opts: LLMOptions,
               given: set[str]) -> dict[str, Any] | None:
        """The draft model of speculative decoding (llm.draft_model), resolved in the same
        store as the model and checked; None when the settings name none.

        GenAI gives the draft a KV cache of its own: with the scheduler's num_kv_blocks
        (the cache sized from the model) as many blocks as the model's, with a cache_size in
        GB the model's split between the two by their KV widths, the draft at least 1 GB
        (openvino-genai 2026.4, SpeculativeDecodingImpl::init_speculative_models)."""
        where = f"model {entry.name!r}"
        tuning = sorted({"draft_device", "draft_tokens", "draft_confidence_threshold"}
                        & given)
        if opts.draft_model is None:
            if tuning:
                raise settings_mod.SettingsError(
                    f"{where}: llm.{tuning[0]} tunes the draft model, which is not set; set "
                    "llm.draft_model to the name of an installed LLM, or leave it out")
            return None
        if opts.prompt_lookup:
            raise settings_mod.SettingsError(
                f"{where}: llm.prompt_lookup and llm.draft_model are two kinds of "
                "speculative decoding, and a model decodes with one; set only one of them")
        if "draft_tokens" in given and opts.draft_confidence_threshold is not None:
            raise settings_mod.SettingsError(
                f"{where}: llm.draft_tokens (a fixed number of proposed tokens) and "
                "llm.draft_confidence_threshold (as many as the draft is sure of) exclude "
                "each other; set one of them")
        if opts.draft_model == entry.name:
            raise settings_mod.SettingsError(
                f"{where}: llm.draft_model names the model itself; a draft must be a "
                "smaller, faster model with the same tokenizer")
        if (entry.path / VISION_MODEL).is_file():
            raise settings_mod.SettingsError(
                f"{where}: llm.draft_model is not available for vision-language models; "
                "leave it out")
        from ovms_plugin.kinds import registry as kinds
        from ovms_plugin.store.store import ModelStore
        store = ModelStore(entry.path.parent)  # the store the model itself came from
        found = store.find(opts.draft_model)
        if found is None:
            llms = [e.name for e in store.list() if e.name != entry.name and
                    (k := kinds.for_task(e.task)) is not None and k.name == self.name]
            raise settings_mod.SettingsError(
                f"{where}: llm.draft_model {opts.draft_model!r} is not an installed model; "
                f"installed LLMs: {', '.join(llms) or 'none'}. Pull it first, or name one "
                "of those")
        kind = kinds.for_task(found.task)
        if kind is None or kind.name != self.name or not \
                (found.path / "openvino_model.xml").is_file():
            raise settings_mod.SettingsError(
                f"{where}: llm.draft_model {found.name!r} is a {found.task} model"
                f"{' (vision-language)' if (found.path / VISION_MODEL).is_file() else ''}; "
                "a draft must be a text LLM with the same tokenizer")
        if found.size >= entry.size:
            log.warning("model %s: its draft model %s is not smaller (%d against %d bytes): "
                        "speculative decoding can only slow it down", entry.name, found.name,
                        found.size, entry.size)
        draft_device = opts.draft_device or device
        family = draft_device.split(".")[0]
        properties = self.compile_properties(family, {}, found.size)
        if draft_device == device:  # the model's own settings, on the same device
            properties.update(ms.properties)
        out: dict[str, Any] = {"model": found.name, "path": str(found.path),
                               "device": draft_device, "properties": properties,
                               "weights_bytes": found.size}
        if opts.draft_confidence_threshold is not None:
            out["assistant_confidence_threshold"] = opts.draft_confidence_threshold
        else:
            out["num_assistant_tokens"] = opts.draft_tokens
        return out

    def compile_properties(self, family: str, options: dict[str, Any],
                           model_bytes: int = 0) -> dict[str, Any]:
        if family == "NPU":  # the stateful NPU pipeline's static prompt and answer sizes
            opts = LLMOptions(**options)
            return {"MAX_PROMPT_LEN": opts.npu_max_prompt_len,
                    "MIN_RESPONSE_LEN": opts.npu_min_response_len}
        if family == "GPU":
            return {"KV_CACHE_PRECISION": "f16"}
        if family == "CPU" and 0 < model_bytes <= SMALL_MODEL_BYTES:
            # A small model is not bound by memory bandwidth: f32 decodes faster than the
            # bf16 a CPU with AVX512-BF16/AMX picks by default (SmolLM2-135M on a Xeon:
            # 17.7 against 20.0 ms per token), and its answers match the reference.
            return {"INFERENCE_PRECISION_HINT": "f32"}
        return {}

    def capacity(self, config: dict[str, Any]) -> int:
        return int(config["scheduler"].get("max_num_seqs", 64))

    def memory_needed(self, entry: ModelEntry, config: dict[str, Any]) -> int:
        """The weights and kernels, plus the KV cache."""
        need = super().memory_needed(entry, config)
        draft = (config.get("speculative") or {}).get("draft")
        if draft is not None:
            need += int(draft["weights_bytes"]) + int(draft.get("kv_bytes", 0))
        if "kv" in config:
            return need + int(config["kv"]["bytes"])
        cache_gb = int(config.get("scheduler", {}).get("cache_size", 0))
        if draft is not None and cache_gb:  # GenAI gives the draft at least 1 GB of it
            cache_gb = max(cache_gb, 2)
        return need + cache_gb * 2**30

    async def on_loaded(self, lm: LoadedModel, config: dict[str, Any]) -> None:
        if "kv" in config:  # the context the KV cache was sized for is the one served
            lm.context = int(config["kv"]["context_length"])
        elif (ctx := lm.settings.options["llm"].get("context_length")) is not None:
            lm.context = min(ctx, lm.context or ctx)
        # Fast streaming detokenization, when it is exact for this tokenizer.
        lm.byte_table = await asyncio.to_thread(detok.load_checked, lm.entry.path,
                                                lm.tokenizer)
        lm.features = generation.features(lm.entry.path, lm.tokenizer,
                                          lm.settings.options["llm"].get("tool_parser"))

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        export_llm_metrics(out, labels, m)


KIND = LLMKind()
