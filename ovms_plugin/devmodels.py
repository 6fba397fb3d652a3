"""Tiny test models built offline, deterministically, and cached on disk.

Usage: ``python -m ovms_plugin.devmodels [--cache DIR] NAME...`` prints one path per name.

Each recipe is a function ``build(out: Path) -> None`` that fills a fresh directory, plus one
entry in ``RECIPES``. The builders need the conversion extras (torch, transformers, tokenizers,
optimum-intel); they are imported inside the functions so this module imports without them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY_CHAT = "tiny-chat"
TINY_CHAT_HF = "tiny-chat-hf"

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


def _make_chat_hf(out: Path, config_args: dict[str, Any]) -> None:
    """Random-weight Qwen2 causal LM with the stdlib-trained ChatML tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(config_args["max_position_embeddings"])
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **config_args,
    )
    torch.manual_seed(_SEED)  # same weights on every build
    model = Qwen2ForCausalLM(config).eval()
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


@dataclass(frozen=True)
class Recipe:
    build: Callable[[Path], None]
    version: int  # bump when the recipe's output changes; it names the cache folder


RECIPES: dict[str, Recipe] = {
    TINY_CHAT: Recipe(make_tiny_chat_ir, 1),
    TINY_CHAT_HF: Recipe(make_tiny_chat_hf, 1),
}


# --- cache ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ovms-plugin" / "test-models"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock; released by the kernel even if the process dies."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_one(cache_dir: Path, name: str, recipe: Recipe) -> Path:
    final = cache_dir / f"{name}-v{recipe.version}"
    if final.is_dir():
        return final  # only complete builds ever get this name
    with _locked(cache_dir / f".{final.name}.lock"):
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
