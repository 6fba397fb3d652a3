"""Streaming detokenization without a tokenizer call per token.

For byte-level BPE tokenizers (GPT-2 style: Qwen, Llama 3, ...), the bytes of every token
are read once from tokenizer.json, and generated text is produced by joining token bytes
through an incremental UTF-8 decoder, which holds back a character split across tokens.
That costs a dictionary lookup per token instead of two OpenVINO detokenizer runs, which
was the front end's largest cost while streaming. Before use, the table is checked
against the model's own OpenVINO detokenizer on random token sequences (invalid UTF-8
included); any difference, or another kind of tokenizer, falls back to the OpenVINO
detokenizer (service.text.Detokenizer).
"""

from __future__ import annotations

import codecs
import json
import logging
import random
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character mapping."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class ByteTable:
    """token id -> bytes; special tokens are skipped, as skip_special_tokens does."""

    def __init__(self, table: dict[int, bytes], special: set[int]) -> None:
        self.table = table
        self.special = special

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> ByteTable | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        decoder = data.get("decoder") or {}
        model = data.get("model") or {}
        if decoder.get("type") != "ByteLevel" or model.get("type") != "BPE":
            return None
        inverse = _byte_decoder()
        try:
            table = {i: bytes(inverse[ch] for ch in tok) for tok, i in model["vocab"].items()}
        except KeyError:
            return None
        special = set()
        for added in data.get("added_tokens") or []:
            if added.get("special"):
                special.add(added["id"])
            else:
                table[added["id"]] = added["content"].encode()
        return cls(table, special)

    def decode(self, ids: list[int]) -> str:
        return self.join(ids).decode("utf-8", errors="replace")

    def join(self, ids: list[int]) -> bytes:
        table, special = self.table, self.special
        return b"".join(table.get(i, b"") for i in ids if i not in special)


class FastDetokenizer:
    """Same interface as service.text.Detokenizer."""

    def __init__(self, table: ByteTable) -> None:
        self.table = table
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, new_ids: list[int]) -> str:
        return self.decoder.decode(self.table.join(new_ids))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def load_checked(folder: Path, ov_tokenizer: Any, samples: int = 300) -> ByteTable | None:
    """The byte table of a model, if its tokenizer is byte-level BPE and the table decodes
    exactly as the model's OpenVINO detokenizer does."""
    table = ByteTable.from_tokenizer_json(folder / "tokenizer.json")
    if table is None:
        return None
    rng = random.Random(0)
    ids = sorted(table.table)
    checks = [[rng.choice(ids) for _ in range(rng.randint(1, 16))] for _ in range(samples)]
    checks += [[i] for i in sorted(table.special)]
    for seq in checks:
        if ov_tokenizer.decode(seq) != table.decode(seq):
            log.info("%s: the tokenizer.json byte table differs from the OpenVINO "
                     "detokenizer; streaming with the OpenVINO detokenizer", folder.name)
            return None
    return table
