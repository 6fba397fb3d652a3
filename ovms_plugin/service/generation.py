"""Chat and generate on a loaded LLM, as text deltas: the prompt rendered and tokenized
(service/prompt.py), the request submitted to the engine, and each of its sequences
(`n` choices) detokenized, cut at stop strings, split into reasoning and content, and
parsed for tool calls.

Per choice, text goes: token ids -> Detokenizer -> StopMatcher -> ThinkSplitter (reasoning
models) -> ToolGate (requests with tools) -> TextDelta. The gate streams text that cannot
be a tool call at once and holds what may be one, parsing it at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.engine.client import EngineError
from ovms_plugin.engine.requests import VISION_MODEL, LLMRequest
from ovms_plugin.service import detok, errors, tools, vision
from ovms_plugin.service import prompt as prompt_mod
from ovms_plugin.service.errors import invalid
from ovms_plugin.service.text import Detokenizer, StopMatcher, TextDelta, TextRequest
from ovms_plugin.service.tools.reasoning import ThinkSplitter, uses_reasoning

if TYPE_CHECKING:
    from ovms_plugin.service.runtime import LoadedModel, Runtime

log = logging.getLogger(__name__)


@dataclass
class TextFeatures:
    """What an LLM's files say about how to talk to it, read once at load."""

    tool_parser: tools.ToolParser  # how its tool calls look
    reasoning: bool = False  # its template knows <think> (reasoning_content)
    samples_by_default: bool = False  # generation_config.json picks the sampling itself
    greedy_by_default: bool = False  # ... and what it picks is greedy decoding
    image_tokens: int = 0  # a vision model's prompt tokens per image, when its config says


def features(folder: Path, tokenizer: Any, tool_parser: str | None = None) -> TextFeatures:
    """A model's TextFeatures; `tool_parser` is the model's setting (None: by template)."""
    template = getattr(tokenizer, "chat_template", "") or ""
    try:
        gen = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        gen = {}
    samples = isinstance(gen, dict) and ("do_sample" in gen or "temperature" in gen)
    return TextFeatures(tools.choose(template, tool_parser), uses_reasoning(template), samples,
                        samples and gen.get("do_sample") is not True,
                        vision.image_tokens(folder))


def check_sees(entry: Any, req: TextRequest) -> None:
    """Refuses a request with images to a model without a vision encoder (from its
    folder, before it is loaded)."""
    if req.images and not (entry.path / VISION_MODEL).is_file():
        raise invalid(f"model {req.model!r} is a text-only model: it cannot see images; "
                      "send text, or pick a vision-language model", "messages")


async def generate(rt: Runtime, req: TextRequest) -> AsyncIterator[TextDelta]:
    """Runs a chat or generate request; yields each choice's text as it is produced. A
    choice's last delta carries its finish_reason and tool calls; every delta carries the
    request's token counts so far."""
    if req.images:  # refused before a text-only model is loaded for nothing
        check_sees(await asyncio.to_thread(rt.entry, req.model), req)
    async with rt.lease(req.model, req.service) as lm, aclosing(_run(lm, req)) as deltas:
        async for d in deltas:
            yield d


class ToolGate:
    """Holds back what may be a tool call. Output that starts like one is held whole; other
    text streams at once, with a tail that could begin the parser's marker (<tool_call>,
    [TOOL_CALLS], ...) held until it is known not to; from a marker on, all is held. At the
    end, what was held is parsed."""

    def __init__(self, parser: tools.ToolParser, forced: bool, known: set[str]) -> None:
        self.parser = parser
        self.known = known  # calls to other names stay text
        self.marker: str | None = parser.start_marker
        self.mode = "call" if forced else "start"  # start -> text -> call
        self.held = ""

    def feed(self, text: str) -> str:
        self.held += text
        if self.mode == "call":
            return ""
        if self.mode == "start":
            stripped = self.held.lstrip()
            if not stripped or self.parser.could_start(stripped):
                return ""
            self.mode = "text"
        if not self.marker:
            out, self.held = self.held, ""
            return out
        # The parser knows where its marker (or a marker's beginning, at the end) starts.
        at = self.parser.start_index(self.held)
        out, self.held = self.held[:at], self.held[at:]
        if self.held.startswith(self.marker):
            self.mode = "call"
        return out

    def finish(self) -> tuple[str, list[tools.ToolCall]]:
        rest, self.held = self.held, ""
        if self.mode == "text" or not rest.strip():
            return rest, []
        return self.parser.parse(rest, self.known)


class _Choice:
    """One sequence of a request, from token ids to deltas."""

    def __init__(self, index: int, lm: LoadedModel, req: TextRequest, opens_think: bool,
                 gate: ToolGate | None) -> None:
        self.index = index
        self.tok = lm.tokenizer
        self.detok: Any = detok.FastDetokenizer(lm.byte_table) if lm.byte_table else \
            Detokenizer(lm.tokenizer)
        self.stops = StopMatcher(req.stop)
        # Reasoning models: the prompt may already have opened <think> (`opens_think`).
        self.think = None
        if opens_think or (lm.features is not None and lm.features.reasoning):
            self.think = ThinkSplitter(in_reasoning=opens_think)
        self.gate = gate
        self.prefix = req.prompt if req.echo and req.prompt else ""
        self.done = False

    def _split(self, text: str, end: bool) -> tuple[str, str]:
        if self.think is None:
            return "", text
        reasoning, content = self.think.feed(text)
        if end:
            r, c = self.think.flush()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def _delta(self, reasoning: str, content: str, logprobs: list | None,
               finish: str | None = None, calls: list | None = None) -> TextDelta | None:
        if self.prefix:
            content, self.prefix = self.prefix + content, ""
        if not (reasoning or content or logprobs or finish or calls):
            return None
        return TextDelta(content, finish, index=self.index, reasoning=reasoning,
                         tool_calls=calls or None, logprobs=logprobs)

    def push(self, ids: list[int], lps: list[float] | None, finish: str | None
             ) -> TextDelta | None:
        text = self.detok.push(ids)
        if finish:
            text += self.detok.flush()
        logprobs = None
        if lps is not None:
            logprobs = [(self.tok.decode([i]), float(p)) for i, p in zip(ids, lps, strict=False)]
        text, hit = self.stops.feed(text)
        if hit:
            return self.end(text, "stop", logprobs)
        if finish:
            return self.end(text + self.stops.flush(), finish, logprobs)
        reasoning, content = self._split(text, end=False)
        if self.gate is not None:
            content = self.gate.feed(content)
        return self._delta(reasoning, content, logprobs)

    def close(self, finish: str) -> TextDelta:
        """Ends the choice when the request ended without news of this sequence."""
        text, hit = self.stops.feed(self.detok.flush())
        return self.end(text if hit else text + self.stops.flush(), "stop" if hit else finish)

    def end(self, text: str, finish: str, logprobs: list | None = None) -> TextDelta:
        """The choice's last delta: what was held back, parsed, and its finish reason."""
        self.done = True
        reasoning, content = self._split(text, end=True)
        calls: list[tools.ToolCall] = []
        if self.gate is not None:
            content = self.gate.feed(content)
            rest, calls = self.gate.finish()
            content += rest
        if calls:
            finish = "tool_calls"
        d = self._delta(reasoning, content, logprobs, finish, calls)
        assert d is not None
        return d


def _max_new_tokens(req: TextRequest, n_prompt: int, context: int | None) -> int:
    if context is None:
        return req.max_tokens or 4096
    if n_prompt >= context:
        raise invalid(f"the prompt has {n_prompt} tokens, but model {req.model!r} has a "
                      f"context of {context} tokens; shorten the prompt", "messages")
    room = context - n_prompt
    if req.max_tokens is None:
        return room
    if req.max_tokens > room:
        raise invalid(f"max_tokens {req.max_tokens} plus the prompt's {n_prompt} tokens "
                      f"exceeds model {req.model!r}'s context of {context}; use max_tokens "
                      f"<= {room}", "max_tokens")
    return req.max_tokens


def _check_engine(lm: LoadedModel, req: TextRequest) -> None:
    """What the stateful (NPU) engine cannot do: several sequences, log-probabilities."""
    if getattr(lm.kind, "name", "") != "llm_stateful":
        return
    where = f"model {req.model!r} runs on the stateful engine ({lm.client.info.get('device')})"
    if req.n > 1:
        raise invalid(f"'n' above 1 is not supported: {where}, which samples one sequence "
                      "at a time; send n 1", "n")
    if req.logprobs:
        raise invalid(f"'logprobs' is not supported: {where}", "logprobs")


def _check_speculative(lm: LoadedModel, req: TextRequest) -> None:
    """Speculative decoding (prompt lookup, a draft model) is a property of the model's
    engine: a request's fields for it are refused where it is off or of the other kind, and
    what it cannot do is refused on it."""
    speculative = lm.client.config.get("speculative") or {}
    lookup, draft = speculative.get("prompt_lookup"), speculative.get("draft")
    if req.num_assistant_tokens and not (lookup or draft):
        raise invalid(f"'num_assistant_tokens' is for speculative decoding (prompt lookup or "
                      f"a draft model), which model {req.model!r} is not set up for; leave "
                      "it out, or set llm.prompt_lookup: true or llm.draft_model in the "
                      "model's settings", "num_assistant_tokens")
    if req.max_ngram_size and not lookup:
        how = "it decodes with a draft model (llm.draft_model)" if draft else \
            "set llm.prompt_lookup: true in the model's settings"
        raise invalid(f"'max_ngram_size' is for prompt-lookup decoding, which model "
                      f"{req.model!r} is not set up for; leave it out ({how})",
                      "max_ngram_size")
    if req.assistant_confidence_threshold is not None and not draft:
        how = "it decodes with prompt lookup, which proposes num_assistant_tokens" if \
            lookup else "set llm.draft_model in the model's settings"
        raise invalid(f"'assistant_confidence_threshold' is for decoding with a draft model, "
                      f"which model {req.model!r} is not set up for; leave it out ({how})",
                      "assistant_confidence_threshold")
    if (lookup or draft) and req.n > 1:
        how = "prompt lookup (llm.prompt_lookup)" if lookup else \
            "a draft model (llm.draft_model)"
        raise invalid(f"'n' above 1 is not supported by model {req.model!r}: it decodes "
                      f"with {how}, which follows one sequence; send n 1", "n")


def _request(lm: LoadedModel, req: TextRequest, ids: list[int],
             n_prompt: int | None = None) -> LLMRequest:
    _check_speculative(lm, req)
    temperature = req.temperature
    f = lm.features
    if temperature is None and not (f and f.samples_by_default):
        temperature = 1.0  # OpenAI's default, when the model's files name none
    if temperature is None and f and f.greedy_by_default and req.n > 1:
        raise invalid(f"'n' is {req.n}, but model {req.model!r} decodes greedily by default "
                      "(its generation_config.json), which gives the same answer every time; "
                      "send a temperature above 0, or n 1", "n")
    return LLMRequest(
        ids, _max_new_tokens(req, len(ids) if n_prompt is None else n_prompt, lm.context),
        temperature=temperature,
        top_p=req.top_p, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, ignore_eos=req.ignore_eos,
        top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        min_new_tokens=req.min_tokens, n=req.n, logprobs=req.logprobs,
        structured=req.structured, num_assistant_tokens=req.num_assistant_tokens,
        max_ngram_size=req.max_ngram_size,
        assistant_confidence_threshold=req.assistant_confidence_threshold)


async def _vision_request(lm: LoadedModel, req: TextRequest, p: prompt_mod.Prompt
                          ) -> tuple[LLMRequest, prompt_mod.PromptIds]:
    """A request with images: they are checked and decoded (off the event loop), and the
    prompt is rendered to text with <ov_genai_image_N> where they go; the engine's
    processor tokenizes it and embeds the images. The token count (for the context check
    and usage) is the text's plus the model's tokens per image, when its config says."""
    images = await vision.load_images(lm, req.model, req.images)
    if p.messages is None:  # a raw prompt (generate): no template, the tokenizer's tokens
        text = p.text or ""
        ids = prompt_mod.encode(lm.tokenizer, text, add_special_tokens=True)
    else:
        try:
            text = prompt_mod.render(lm.tokenizer, p)
        except prompt_mod.TemplateError as e:
            raise invalid(f"the model's chat template could not render these messages: "
                          f"{e}", "messages") from None
        ids = prompt_mod.encode(lm.tokenizer, text, add_special_tokens=False)
    n_prompt = len(ids) + len(images) * (lm.features.image_tokens if lm.features else 0)
    payload = _request(lm, req, [], n_prompt)
    payload.prompt, payload.images, payload.prompt_tokens = text, images, n_prompt
    return payload, prompt_mod.PromptIds([], prompt_mod.opens_in_prompt(text))


async def _run(lm: LoadedModel, req: TextRequest) -> AsyncIterator[TextDelta]:
    _check_engine(lm, req)
    if req.service == "chat":
        p = prompt_mod.Prompt(messages=req.messages, tools=req.tools,
                              extra=req.template_kwargs)
    else:
        p = prompt_mod.Prompt(text=req.prompt)
    if req.images or lm.client.info.get("vision"):
        # A vision model's language model takes embeddings, not token ids: its requests,
        # with images or without, go to its processor as text.
        payload, pids = await _vision_request(lm, req, p)
        n_prompt = payload.prompt_tokens
    else:
        try:
            pids = await prompt_mod.prompt_ids(lm, p)
        except prompt_mod.TemplateError as e:
            raise invalid(f"the model's chat template could not render these messages: {e}",
                          "messages") from None
        n_prompt = len(pids.ids)
        if lm.max_prompt and n_prompt > lm.max_prompt:
            raise invalid(f"the prompt has {n_prompt} tokens, but model {req.model!r} runs "
                          f"on {lm.client.info.get('device')} with a prompt limit of "
                          f"{lm.max_prompt} tokens (MAX_PROMPT_LEN); shorten the prompt, or "
                          "raise npu_max_prompt_len in the model's llm settings", "messages")
        payload = _request(lm, req, pids.ids)
    choices = []
    for i in range(req.n):
        gate = None
        if req.tools is not None:
            forced = req.tool_choice != "auto"
            parser = tools.PARSERS["json"] if forced else lm.features.tool_parser
            gate = ToolGate(parser, forced, {t["function"]["name"] for t in req.tools})
        choices.append(_Choice(i, lm, req, pids.opens_think, gate))
    n_out = 0
    try:
        async with aclosing(lm.client.submit(payload)) as outputs:
            async for out in outputs:
                lm.last_used = time.monotonic()
                seqs = [(0, out.result, None, out.finish)] if payload.plain else \
                    (out.result or [])
                for index, ids, lps, finish in seqs:
                    c = choices[index]
                    if c.done:
                        continue
                    n_out += len(ids)
                    d = c.push(ids, lps, finish)
                    if d is not None:
                        d.prompt_tokens, d.completion_tokens = n_prompt, n_out
                        yield d
                if out.finish:
                    for c in choices:
                        if not c.done:
                            d = c.close(out.finish)
                            d.prompt_tokens, d.completion_tokens = n_prompt, n_out
                            yield d
                if all(c.done for c in choices):
                    return
    except EngineError as e:
        raise errors.from_engine(e.failure) from None
