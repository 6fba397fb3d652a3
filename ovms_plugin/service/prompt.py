"""The prompt of a chat or generate request as token ids: the chat template rendered with
the model's tokenizer (with the request's tools and template arguments), then encoded; long
prompts in a helper process, so the front end's event loop never waits on them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import sys
import weakref
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ovms_plugin import osutil
from ovms_plugin.service.tools.reasoning import opens_in_prompt

if TYPE_CHECKING:
    from ovms_plugin.service.runtime import LoadedModel

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prompt:
    """What is rendered: chat messages (with the tools and the template's extra arguments),
    or a generate prompt as it is."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None

    def chars(self) -> int:
        if self.messages is not None:
            return sum(len(str(m.get("content") or "")) for m in self.messages)
        return len(self.text or "")


@dataclass(slots=True)
class PromptIds:
    ids: list[int]
    opens_think: bool = False  # the rendered prompt ends inside <think> (reasoning models)


def encode(tok: Any, text: str, add_special_tokens: bool) -> list[int]:
    enc = tok.encode(text, add_special_tokens=add_special_tokens)
    return enc.input_ids.data[0].tolist()


# --- the prompt's template and tokens, off the event loop -------------------------------
#
# openvino_genai 2026.4's Tokenizer.apply_chat_template and encode hold the GIL for their
# whole run (its bindings release it in neither), so in a thread they would stall the event
# loop just as long: long prompts go to a helper process with its own copy of the
# tokenizer instead. Measured with SmolLM2-135M on the 2-core machine, render plus encode
# on the loop: about 1 ms for a chat of a few hundred characters (mostly per-call cost),
# 2-3 ms at 8k characters, 15 ms at 100k, 65 ms at 1M (bodies go up to 16 MB). Through the
# helper the front end spends 0.7, 1.1 and 2.2 ms of CPU on a 10k, 100k and 1M prompt, in
# small pieces, and answers 1-3 ms later than inline at 10k-100k. The helper costs ~135 MB and
# 1.3-3 s to start (openvino_genai and the tokenizer), so prompts up to INLINE_PROMPT_CHARS
# (where inline costs about what a helper round trip does) stay on the loop, and ordinary
# chats never start it. An asyncio.to_thread hop would only have added latency: 1.71
# against 1.61 ms for a short chat, with the loop held as long.
INLINE_PROMPT_CHARS = 8192  # characters of message contents (chat) or prompt (generate)
PROMPT_HELPER_IDLE = 120.0  # seconds without a long prompt before the helper exits
_PROMPT_HELPER_TOKENIZERS = 4  # tokenizers the helper keeps (one per model), newest used


class TemplateError(Exception):
    """The model's chat template refused the messages; the message is the template's."""


class _HelperGone(Exception):
    """The prompt helper could not start, died, or failed otherwise: do the work inline."""


def render(tok: Any, p: Prompt) -> str:
    """A chat's messages rendered with the model's template (raises TemplateError)."""
    assert p.messages is not None
    try:
        return tok.apply_chat_template(p.messages, add_generation_prompt=True,
                                       tools=p.tools, extra_context=p.extra)
    except Exception as e:
        raise TemplateError(str(e)) from None


def render_encode(tok: Any, p: Prompt) -> PromptIds:
    """The prompt's token ids: a chat rendered with the model's template (its special
    tokens are in the template), or a generate prompt with the tokenizer's special tokens."""
    if p.messages is not None:
        text = render(tok, p)
        return PromptIds(encode(tok, text, add_special_tokens=False), opens_in_prompt(text))
    return PromptIds(encode(tok, p.text or "", add_special_tokens=True))


async def prompt_ids(lm: LoadedModel, p: Prompt) -> PromptIds:
    """Renders and tokenizes the request's prompt: on the event loop when it is short, in
    the helper process when it is long (the same tokenizer files, so the same ids).
    Raises TemplateError when the chat template refuses the messages."""
    if p.chars() > INLINE_PROMPT_CHARS:
        try:
            return await _prompt_helper().ids(lm, p)
        except _HelperGone as e:
            log.warning("rendering a long prompt on the event loop: %s", e)
    return render_encode(lm.tokenizer, p)


_helpers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PromptHelper] = \
    weakref.WeakKeyDictionary()


def _prompt_helper() -> _PromptHelper:
    """The running event loop's helper process, started anew after it exited."""
    loop = asyncio.get_running_loop()
    helper = _helpers.get(loop)
    if helper is None or helper.closed:
        helper = _helpers[loop] = _PromptHelper()
    return helper


class _PromptHelper:
    """A child process (`_prompt_helper_main`) that renders and tokenizes long prompts, one
    at a time, in request order. Requests and replies are length-prefixed pickles on its
    stdin and stdout. It exits when its stdin closes: after PROMPT_HELPER_IDLE seconds
    without work, or when this process ends however it ends."""

    def __init__(self) -> None:
        self.closed = False
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.users = 0
        self._ids = itertools.count()
        self._starting = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None

    async def ids(self, lm: LoadedModel, p: Prompt) -> PromptIds:
        self.users += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            kind, value = await self._ask(lm, p)
        finally:
            self.users -= 1
            if not self.users and not self.closed:
                self._idle = asyncio.get_running_loop().call_later(PROMPT_HELPER_IDLE,
                                                                   self.close)
        if kind == "template":
            raise TemplateError(value)
        if kind != "ok":
            raise _HelperGone(f"the prompt helper failed: {value}")
        return value

    async def _ask(self, lm: LoadedModel, p: Prompt) -> tuple[str, Any]:
        async with self._starting:
            if self.proc is None and not self.closed:
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", "from ovms_plugin.service.prompt import "
                        "_prompt_helper_main as m; m()", str(os.getpid()),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        **osutil.child_popen_kwargs())
                    with contextlib.suppress(OSError):  # its stdin's EOF still ends it
                        osutil.tie_to_plugin(self.proc.pid)
                except OSError as e:
                    self.closed = True
                    raise _HelperGone(f"the prompt helper could not start: {e}") from None
                self._reader = asyncio.create_task(self._read(self.proc))
        if self.closed or self.proc is None or self.proc.stdin is None:
            raise _HelperGone("the prompt helper exited")
        rid = next(self._ids)
        fut = self.pending[rid] = asyncio.get_running_loop().create_future()
        # The helper keys its tokenizers by folder and load time: a model deleted and
        # pulled again under the same name gets a new one.
        data = pickle.dumps((rid, str(lm.entry.path), lm.loaded_at, p),
                            protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(len(data).to_bytes(8, "little") + data)
            await self.proc.stdin.drain()
            return await fut
        except (ConnectionError, _HelperGone) as e:
            raise _HelperGone(f"the prompt helper failed: {e}") from None
        finally:
            self.pending.pop(rid, None)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                size = int.from_bytes(await proc.stdout.readexactly(8), "little")
                rid, kind, value = pickle.loads(await proc.stdout.readexactly(size))
                fut = self.pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result((kind, value))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed = True
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(_HelperGone("it exited"))
        with suppress(ProcessLookupError):
            await proc.wait()

    def close(self) -> None:
        """Lets the helper exit (EOF on its stdin); the next long prompt starts another."""
        self.closed = True
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()


def _prompt_helper_main() -> None:
    """The prompt helper process (see _PromptHelper): reads (id, model folder, load time,
    Prompt), answers (id, "ok", PromptIds), (id, "template", message) or
    (id, "error", message). Ends at EOF on stdin, or with the front end."""
    from collections import OrderedDict

    import openvino_genai as ov_genai

    from ovms_plugin.procs import die_with_parent
    die_with_parent(int(sys.argv[1]))
    # The protocol keeps the real stdout; anything else printing there goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    tokenizers: OrderedDict[str, tuple[float, Any]] = OrderedDict()
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        rid, path, loaded_at, p = pickle.loads(
            inp.read(int.from_bytes(head, "little")))
        try:
            cached = tokenizers.pop(path, None)
            if cached is None or cached[0] != loaded_at:
                # As _load_tokenizer: the same files and properties give the same ids.
                cached = (loaded_at, ov_genai.Tokenizer(path, INFERENCE_NUM_THREADS=1))
            tokenizers[path] = cached
            while len(tokenizers) > _PROMPT_HELPER_TOKENIZERS:
                tokenizers.popitem(last=False)
            reply = (rid, "ok", render_encode(cached[1], p))
        except TemplateError as e:
            reply = (rid, "template", str(e))
        except Exception as e:
            reply = (rid, "error", f"{type(e).__name__}: {e}")
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(len(data).to_bytes(8, "little") + data)
        out.flush()
