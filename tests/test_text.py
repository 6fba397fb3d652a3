"""Request validation, streaming detokenization (UTF-8 split across tokens) and stop
strings, with real tokenizers: the real SmolLM2's (converted from its GGUF, the one users
of the built-in default get) and the tiny test model's, whose vocabulary, trained on ASCII
code, splits every other character into bytes (the hardest case for holding text back)."""

from __future__ import annotations

from pathlib import Path

import openvino_genai as ov_genai
import pytest
from conftest import CHAT, REAL

from ovms_plugin import devmodels
from ovms_plugin.service import text
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.text import Detokenizer, StopMatcher

FOLDERS = {REAL: devmodels.SMOLLM2, CHAT: devmodels.TINY_CHAT}


@pytest.fixture(scope="module")
def tokenizers(test_models: dict[str, Path]) -> dict[str, ov_genai.Tokenizer]:
    return {name: ov_genai.Tokenizer(str(test_models[model])) for name, model in FOLDERS.items()}


@pytest.fixture
def tokenizer(tokenizers):
    """tiny-chat's tokenizer: the fast detokenizer needs its tokenizer.json."""
    return tokenizers[CHAT]


@pytest.fixture(params=[REAL, CHAT])
def any_tokenizer(request, tokenizers):
    return tokenizers[request.param]


def test_utf8_split_across_tokens_is_held_back(any_tokenizer):
    tokenizer = any_tokenizer
    sample = "héllo 世界 🙂 naïve — ok"
    ids = tokenizer.encode(sample, add_special_tokens=False).input_ids.data[0].tolist()
    # Byte-level vocabularies split these characters into bytes (tiny-chat's, trained on
    # ASCII code, nearly all of them; SmolLM2's the CJK characters and the emoji).
    assert len(ids) > len(sample) // 2
    assert any(tokenizer.decode([i]) in ("", "\ufffd") for i in ids)  # a part of a character
    detok = Detokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == sample
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # still streamed piece by piece


def test_detokenizer_flushes_an_incomplete_tail(any_tokenizer):
    tokenizer = any_tokenizer
    ids = tokenizer.encode("🙂", add_special_tokens=False).input_ids.data[0].tolist()
    assert len(ids) > 1
    detok = Detokenizer(tokenizer)
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == tokenizer.decode(ids[:-1])  # the generation ended mid-character


def test_stop_matcher_holds_back_a_possible_stop():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D and more") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("x") == ("Ex", False)
    assert m.flush() == ""
    assert StopMatcher([]).feed("anything") == ("anything", False)


def test_stop_matcher_earliest_of_several():
    m = StopMatcher(["zz", "b"])
    assert m.feed("aazzb") == ("aa", True)


@pytest.mark.parametrize("body,needle", [
    ([], "JSON object"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "string"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "image part without a URL"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "has type 'image'"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": "a"}, "seed"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "presence_penalty": 3}, "presence_penalty"),
])
def test_parse_refuses(body, needle):
    with pytest.raises(ServiceError) as e:
        text.parse("chat", body)
    assert needle in str(e.value) and e.value.code == 4003 and e.value.http_status == 400


def test_parse_accepts_openai_fields():
    req = text.parse("chat", {"model": "m", "stream": True, "max_tokens": 5, "stop": "x",
                              "temperature": 0, "seed": 3, "messages": [
                                  {"role": "system", "content": "be brief"},
                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert req.stream and req.max_tokens == 5 and req.stop == ["x"] and req.seed == 3
    assert req.messages[1] == {"role": "user", "content": "hi"}
    assert text.parse("generate", {"model": "m", "prompt": ["one"]}).prompt == "one"


def test_fast_detokenizer_matches_openvino(tokenizer, test_models: dict[str, Path]):
    from ovms_plugin.service.detok import FastDetokenizer, load_checked
    table = load_checked(test_models["tiny-chat"], tokenizer)
    assert table is not None  # byte-level BPE, checked against the OpenVINO detokenizer
    sample = "héllo 世界 🙂 naïve — ok"
    ids = tokenizer.encode(sample, add_special_tokens=False).input_ids.data[0].tolist()
    detok = FastDetokenizer(table)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == sample and not any("\ufffd" in p for p in pieces)
    # Random ids (invalid UTF-8 among them), fed in uneven groups, end as the OpenVINO
    # detokenizer decodes them at once.
    import random
    rng = random.Random(1)
    for _ in range(50):
        seq = [rng.randrange(len(table.table)) for _ in range(rng.randint(1, 30))]
        detok = FastDetokenizer(table)
        out, i = "", 0
        while i < len(seq):
            k = rng.randint(1, 4)
            out += detok.push(seq[i:i + k])
            i += k
        assert out + detok.flush() == tokenizer.decode(seq)


def test_fast_detokenizer_refuses_other_tokenizers(tmp_path: Path, tokenizer, tokenizers,
                                                   test_models: dict[str, Path]):
    from ovms_plugin.service.detok import load_checked
    (tmp_path / "tokenizer.json").write_text('{"decoder": {"type": "Metaspace"}, '
                                             '"model": {"type": "Unigram"}}')
    assert load_checked(tmp_path, tokenizer) is None
    assert load_checked(tmp_path / "missing", tokenizer) is None
    # A model converted from a GGUF has no tokenizer.json: the OpenVINO detokenizer streams.
    assert load_checked(test_models[devmodels.SMOLLM2], tokenizers[REAL]) is None
