"""Long prompts are rendered and tokenized off the front end's event loop (issue 13, item 4).

openvino_genai's Tokenizer holds the GIL while it renders or encodes, so a thread would not
free the loop: prompts over INLINE_PROMPT_CHARS go to a helper process with its own copy
of the tokenizer. These tests prove the mechanism without timing anything: the front end's
tokenizer is not called for a long prompt (only the helper's is), the token ids, counts
and output are those of the old inline path, template errors read the same, and a helper
that cannot start or dies costs nothing but the inline path."""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import random
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost
from ovms_plugin.engine.client import Output
from ovms_plugin.service import generation
from ovms_plugin.service import prompt as rt_mod
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import LoadedModel, Runtime
from ovms_plugin.service.text import TextDelta, TextRequest
from ovms_plugin.store.store import ModelEntry, ModelStore


def words(chars: int, seed: int = 0) -> str:
    """Varied English-like text (SmolLM2: about 3.5 characters a token)."""
    rnd = random.Random(seed)
    vocab = ("the of and to in is that it for on with as was at by river stone quiet "
             "window market garden letter morning silver harbor lantern engine").split()
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rnd.choice(vocab))
    return " ".join(out)[:chars]


LONG = rt_mod.INLINE_PROMPT_CHARS + 4000  # over the threshold, well inside 8192 tokens


class SpyTokenizer:
    """The front end's tokenizer, recording which thread renders and encodes."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.calls: list[tuple[str, threading.Thread]] = []

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("apply_chat_template", threading.current_thread()))
        return self.tok.apply_chat_template(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("encode", threading.current_thread()))
        return self.tok.encode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


class EchoClient:
    """An engine that answers with the last prompt ids, so the output depends on them."""

    def __init__(self) -> None:
        self.info = {"device": "CPU"}
        self.config: dict[str, Any] = {}  # the engine config (runtime.Client)
        self.payloads: list[dict] = []

    async def submit(self, payload: Any):
        self.payloads.append(payload)
        yield Output(payload.ids[-4:-2], None)
        yield Output(payload.ids[-2:], "length")


def runtime_for(tmp_path: Path, folder: Path, tok: Any) -> tuple[Runtime, LoadedModel]:
    runtime = Runtime(ModelStore(tmp_path / "store"))
    entry = ModelEntry(name="m", path=folder, manifest={"task": "text-generation"})
    lm = LoadedModel(entry=entry, client=EchoClient(), settings=None,  # type: ignore[arg-type]
                     tokenizer=SpyTokenizer(tok), context=8192)

    @contextlib.asynccontextmanager
    async def lease(model: str, service: str | None = None):
        yield lm

    runtime.lease = lease  # type: ignore[method-assign]
    return runtime, lm


async def run_text(runtime: Runtime, req: TextRequest) -> list[TextDelta]:
    return [d async for d in generation.generate(runtime, req)]


def chat(content: str, **kw: Any) -> TextRequest:
    return TextRequest(service="chat", model="m", max_tokens=4,
                       messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": content}], **kw)


def generate(prompt: str) -> TextRequest:
    return TextRequest(service="generate", model="m", max_tokens=4, prompt=prompt)


@pytest.fixture(scope="module")
def smollm2(test_models: dict[str, Path]) -> tuple[Path, Any]:
    import openvino_genai as ov_genai
    folder = test_models[devmodels.SMOLLM2]
    return folder, ov_genai.Tokenizer(str(folder), INFERENCE_NUM_THREADS=1)


def test_long_prompts_go_to_the_helper_with_the_inline_results(
        tmp_path: Path, smollm2: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch):
    folder, tok = smollm2
    runtime, lm = runtime_for(tmp_path, folder, tok)
    spy: SpyTokenizer = lm.tokenizer
    requests = [chat(words(LONG, 1)), generate(words(LONG, 2))]

    async def through_helper() -> tuple[list[list[TextDelta]], int]:
        out = [await run_text(runtime, req) for req in requests]
        helper = rt_mod._prompt_helper()
        assert helper.proc is not None and helper.proc.returncode is None
        return out, helper.proc.pid

    helped, pid = asyncio.run(through_helper())
    assert pid != os.getpid()
    # The front end's tokenizer never rendered nor encoded: the helper process did.
    assert spy.calls == []
    helped_ids = [p.ids for p in lm.client.payloads]

    # The old path: everything inline, on the event loop's thread.
    monkeypatch.setattr(rt_mod, "INLINE_PROMPT_CHARS", 10**9)
    lm.client.payloads.clear()
    inline = [asyncio.run(run_text(runtime, req)) for req in requests]
    assert {name for name, _ in spy.calls} == {"apply_chat_template", "encode"}
    assert all(thread is threading.main_thread() for _, thread in spy.calls)
    inline_ids = [p.ids for p in lm.client.payloads]

    assert helped_ids == inline_ids
    assert helped == inline  # text, finish reason, prompt and completion token counts
    for req, deltas, ids in zip(requests, helped, inline_ids, strict=True):
        assert deltas[-1].prompt_tokens == len(ids) > 1000
        if req.service == "chat":
            prompt = tok.apply_chat_template(req.messages, add_generation_prompt=True)
            assert ids == tok.encode(prompt, add_special_tokens=False) \
                .input_ids.data[0].tolist()


def test_short_prompts_stay_on_the_event_loop(tmp_path: Path, smollm2: tuple[Path, Any]):
    folder, tok = smollm2
    runtime, lm = runtime_for(tmp_path, folder, tok)

    async def main() -> list[TextDelta]:
        deltas = await run_text(runtime, chat("What is the capital of France?"))
        assert asyncio.get_running_loop() not in rt_mod._helpers  # no helper was started
        return deltas

    deltas = asyncio.run(main())
    assert [name for name, _ in lm.tokenizer.calls] == ["apply_chat_template", "encode"]
    assert all(thread is threading.main_thread() for _, thread in lm.tokenizer.calls)
    assert deltas[-1].prompt_tokens == len(lm.client.payloads[0].ids)


@pytest.fixture
def refusing_template(tmp_path: Path, test_models: dict[str, Path]) -> Path:
    """The tiny chat model with a template that refuses a system message after the first."""
    folder = tmp_path / "refusing"
    shutil.copytree(test_models[devmodels.TINY_CHAT], folder)
    xml = folder / "openvino_tokenizer.xml"
    text = xml.read_text()
    found = re.search(r'<chat_template value="([^"]*)"', text)
    assert found, "the tiny chat model's tokenizer IR carries its chat template"
    template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                "{{ raise_exception('System messages must come first') }}{% endif %}"
                "{{ m['content'] }}{% endfor %}")
    xml.write_text(text[:found.start(1)] + html.escape(template, quote=True)
                   + text[found.end(1):])
    return folder


def test_template_errors_read_the_same_from_the_helper(
        tmp_path: Path, refusing_template: Path, monkeypatch: pytest.MonkeyPatch):
    import openvino_genai as ov_genai
    tok = ov_genai.Tokenizer(str(refusing_template), INFERENCE_NUM_THREADS=1)
    runtime, lm = runtime_for(tmp_path, refusing_template, tok)
    req = TextRequest(service="chat", model="m", max_tokens=4,
                      messages=[{"role": "user", "content": words(LONG)},
                                {"role": "system", "content": "late"}])

    def refusal() -> ServiceError:
        with pytest.raises(ServiceError) as e:
            asyncio.run(run_text(runtime, req))
        return e.value

    helped = refusal()
    assert lm.tokenizer.calls == []
    monkeypatch.setattr(rt_mod, "INLINE_PROMPT_CHARS", 10**9)
    inline = refusal()
    assert lm.tokenizer.calls  # this time the front end rendered it
    assert "System messages must come first" in str(helped)
    assert str(helped) == str(inline)
    assert (helped.code, helped.param) == (inline.code, inline.param)
    assert helped.param == "messages"


def test_a_helper_that_cannot_start_or_dies_leaves_the_inline_path(
        tmp_path: Path, smollm2: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch):
    folder, tok = smollm2
    runtime, lm = runtime_for(tmp_path, folder, tok)
    req = chat(words(LONG, 3))

    async def killed_then_replaced() -> tuple[int, int]:
        await run_text(runtime, req)
        first = rt_mod._prompt_helper()
        assert first.proc is not None
        first.proc.kill()
        await first.proc.wait()
        for _ in range(100):  # its reader sees the end of the pipe
            if first.closed:
                break
            await asyncio.sleep(0.01)
        assert first.closed
        await run_text(runtime, req)  # a new helper
        second = rt_mod._prompt_helper()
        assert second is not first and second.proc is not None
        return first.proc.pid, second.proc.pid

    first_pid, second_pid = asyncio.run(killed_then_replaced())
    assert first_pid != second_pid
    assert lm.tokenizer.calls == []

    async def no_process(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no processes left")

    monkeypatch.setattr(rt_mod.asyncio, "create_subprocess_exec", no_process)
    deltas = asyncio.run(run_text(runtime, req))
    assert [name for name, _ in lm.tokenizer.calls] == ["apply_chat_template", "encode"]
    ids = [p.ids for p in lm.client.payloads]
    assert ids[0] == ids[1] == ids[2]
    assert deltas[-1].prompt_tokens == len(ids[0])


def test_long_chat_through_the_plugin(host: AogHost, smollm2: tuple[Path, Any]):
    """End to end as AOG calls it: the plugin counts a long prompt exactly. Refused for
    max_tokens beyond the context, so the engine runs nothing (no slow prefill)."""
    _, tok = smollm2
    messages = [{"role": "user", "content": words(LONG, 4)}]
    r = host.invoke("chat", {"model": REAL, "messages": messages, "max_tokens": 8000})
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    n = len(tok.encode(prompt, add_special_tokens=False).input_ids.data[0])
    assert r.code != 0
    assert f"plus the prompt's {n} tokens exceeds" in r.message, r.message
