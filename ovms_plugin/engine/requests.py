"""The requests and results each kind's engine takes and gives, as they cross the worker
boundary (the kinds re-export their own: kinds/llm.py's LLMRequest, ...). They live here,
beside the engines, so that engines import no kind module (kinds import their engines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A vision-language model's folder holds its vision encoder beside the language model.
VISION_MODEL = "openvino_vision_embeddings_model.xml"


# kinds/llm.py
@dataclass(slots=True)
class LLMRequest:
    """What the front end sends an LLM engine (both variants): the prompt's token ids and
    the sampling settings. Its step outputs' results are the new token ids."""

    ids: list[int]
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    n: int = 1  # sequences to sample from the one prompt (num_return_sequences)
    logprobs: bool = False  # each new token's log-probability along with it
    # Constrained decoding (XGrammar): ("json_schema", schema text) or ("regex", pattern).
    structured: tuple[str, str] | None = None
    # Speculative decoding, on engines set up for it (None: the model's settings): prompt
    # lookup takes the first two, a draft model the first or the third.
    num_assistant_tokens: int | None = None
    max_ngram_size: int | None = None
    assistant_confidence_threshold: float | None = None
    # Vision: the rendered prompt as text, its images (uint8 [H, W, 3] arrays) in the order
    # of their <ov_genai_image_N> tags, and the prompt's estimated token count (`ids` is
    # then empty: the engine's own processor tokenizes the text and embeds the images).
    prompt: str | None = None
    images: list[Any] | None = None
    prompt_tokens: int = 0

    @property
    def plain(self) -> bool:
        """One sequence without log-probabilities: its step results are bare token ids;
        otherwise they are LLMSeqs."""
        return self.n == 1 and not self.logprobs


# kinds/llm.py: news of one of a request's sequences (when n > 1 or logprobs were asked
# for): (index, new token ids, their log-probabilities or None, finish reason or None). A
# plain tuple: it crosses the worker boundary once per step and sequence.
LLMSeq = tuple[int, list[int], list[float] | None, str | None]


# kinds/embed.py
@dataclass(slots=True)
class EmbedJob:
    """Texts to embed; `limit` tokens per text (None: the engine's max_length); over it,
    cut when `truncate`, else refused with the counts alone."""

    texts: list[str]
    limit: int | None = None
    truncate: bool = False


# kinds/embed.py
@dataclass(slots=True)
class EmbedResult:
    vectors: Any  # float32 [n, dim]; None when refused (a text over the limit)
    counts: list[int]  # tokens per text


# kinds/rerank.py
@dataclass(slots=True)
class RerankJob:
    """A query and its documents. The result: [(document index, score), ...]."""

    query: str
    documents: list[str]


# kinds/image.py
@dataclass(slots=True)
class ImageJob:
    """One text-to-image or image-to-image request, resolved against the model
    (service/image.py). With `image` it edits that image (Image2ImagePipeline), and with
    `mask` too it repaints the mask's white part (InpaintingPipeline)."""

    prompt: str
    width: int
    height: int
    steps: int
    n: int = 1
    seed: int = 42
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    image: Any = None  # np.ndarray uint8 [height, width, 3] RGB, already at width x height
    mask: Any = None  # np.ndarray uint8 [height, width, 3], white: repaint
    strength: float | None = None  # None: the pipeline's default


# kinds/image.py
@dataclass(slots=True)
class ImageProgress:
    step: int  # denoising steps done
    steps: int


# kinds/image.py
@dataclass(slots=True)
class ImageResult:
    images: list[bytes]  # PNGs


# kinds/speech.py
@dataclass(slots=True)
class TranscribeJob:
    """Speech to text: float32 mono samples at 16 kHz (service/audio.py decodes them)."""

    samples: Any  # np.ndarray float32
    language: str | None = None  # "<|en|>"; None: detected
    task: str = "transcribe"  # or "translate" (to English)
    timestamps: bool = True  # segments with start and end times
    prompt: str | None = None  # initial prompt: spellings, style
    temperature: float = 0.0  # 0: greedy


# kinds/speech.py
@dataclass(slots=True)
class TranscribeResult:
    text: str
    segments: list[tuple[float, float, str]]  # (start s, end s, text)
    language: str | None  # the language token decoded ("<|en|>"), given or detected
    seconds: float  # audio length
    processing_seconds: float


# kinds/tts.py
@dataclass(slots=True)
class SpeakJob:
    """Text to speech, one sentence after another (the front end splits the text)."""

    sentences: list[str]
    voice: str | None = None  # a speaker embedding the model folder ships; None: the default
    speed: float | None = None  # only engines whose model honours it get one


# kinds/tts.py
@dataclass(slots=True)
class SpeechChunk:
    index: int  # the sentence's
    samples: Any  # np.ndarray float32 mono at `rate`
    rate: int
