"""Reasoning split off generated text: <think>...</think> (Qwen3, DeepSeek-R1, ...).

Our own splitter rather than openvino_genai's: its DeepSeekR1ReasoningParser leaves the tags
in the reasoning and the content, and its incremental parser works on its own message dicts.

Rules: one reasoning block, which the start tag opens only at the very beginning of the
output (leading whitespace allowed), or which the prompt already opened (in_reasoning; a
start tag repeated by the model is then dropped). After the end tag everything is content,
tags included. The reasoning is stripped of whitespace at both ends, the content of leading
whitespace after the end tag. Output with no end tag: all reasoning when it opened, else all
content."""

from __future__ import annotations

from ._base import partial_suffix

_START, _REASON, _AFTER, _CONTENT = range(4)


class ThinkSplitter:
    """Streaming splitter. feed() returns what is safe to emit now, holding back a tail
    that could be part of a tag; no part of a tag is ever emitted."""

    def __init__(self, start: str = "<think>", end: str = "</think>",
                 in_reasoning: bool = False):
        if not start or not end:
            raise ValueError("the tags must not be empty")
        self.start, self.end = start, end
        self.in_reasoning = in_reasoning
        self._state = _START
        self._buf = ""
        self._begun = False  # some reasoning text (not whitespace) emitted or held

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) to emit now."""
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            buf = self._buf
            if self._state == _START:
                s = buf.lstrip()
                if not s or (self.start.startswith(s) and s != self.start):
                    break  # may still be the start tag
                if s.startswith(self.start):
                    self._state, self._buf = _REASON, s[len(self.start):]
                else:
                    self._state = _REASON if self.in_reasoning else _CONTENT
            elif self._state == _REASON:
                if not self._begun:
                    buf = self._buf = buf.lstrip()
                    if not buf:
                        break
                    self._begun = True
                i = buf.find(self.end)
                if i >= 0:
                    reasoning.append(buf[:i].rstrip())
                    self._state, self._buf = _AFTER, buf[i + len(self.end):]
                    continue
                k = partial_suffix(buf, self.end)
                ready = buf[:len(buf) - k]
                kept = ready.rstrip()  # whitespace held: it may come just before the end tag
                reasoning.append(kept)
                self._buf = buf[len(kept):]
                break
            elif self._state == _AFTER:
                self._buf = buf.lstrip()
                if not self._buf:
                    break
                self._state = _CONTENT
            else:
                content.append(buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """The held tail at the end of the output (a partial tag is plain text then)."""
        buf, self._buf = self._buf, ""
        if self._state == _START:
            if self.in_reasoning:
                self._state = _REASON
                return buf.strip(), ""
            self._state = _CONTENT
            return "", buf
        if self._state == _REASON:
            return buf.strip() if not self._begun else buf.rstrip(), ""
        return "", buf if self._state == _CONTENT else ""


def uses_reasoning(template: str) -> bool:
    """The chat template knows <think> reasoning."""
    template = template or ""
    return "<think>" in template or "enable_thinking" in template


def opens_in_prompt(rendered_prompt: str, start: str = "<think>") -> bool:
    """The rendered prompt ends with an open start tag (whitespace allowed after it)."""
    return (rendered_prompt or "").rstrip().endswith(start)
