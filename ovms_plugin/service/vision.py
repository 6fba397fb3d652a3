"""Images in chat (vision-language models): where each image comes from (a data: URL or
base64; a local file or an http(s) URL only when the model's settings allow), checked and
decoded off the event loop into the uint8 [H, W, 3] arrays the engine takes, and the
prompt rendered to text with GenAI's <ov_genai_image_N> marks where the images go."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovms_plugin.service import image as image_mod
from ovms_plugin.service.errors import invalid
from ovms_plugin.store.store import read_json

if TYPE_CHECKING:
    from ovms_plugin.service.runtime import LoadedModel

_REMOTE = re.compile(r"^https?://", re.IGNORECASE)
_OTHER_SCHEME = re.compile(r"^(file|ftp|s3|gs)://", re.IGNORECASE)
LOW_DETAIL_SIDE = 512  # OpenAI's detail "low": the image at most this many pixels a side
FETCH_TIMEOUT = 20.0  # seconds for one remote image, when remote images are allowed


def check_model(lm: LoadedModel, model: str, n_images: int) -> dict[str, Any]:
    """The model's image limits; refuses images sent to a text-only model, or too many."""
    if getattr(lm.kind, "name", "") == "llm_stateful":
        raise invalid(f"model {model!r} runs on the stateful engine "
                      f"({lm.client.info.get('device')}), which takes no images; send text",
                      "messages")
    if not lm.client.info.get("vision"):
        raise invalid(f"model {model!r} is a text-only model: it cannot see images; send "
                      "text, or pick a vision-language model", "messages")
    opts = lm.settings.options["llm"]
    limit = int(opts.get("max_images") or 8)
    if n_images > limit:
        raise invalid(f"the request has {n_images} images, over model {model!r}'s limit of "
                      f"{limit} (llm.max_images)", "messages")
    return opts


async def _fetch(url: str, max_bytes: int, where: str) -> bytes:
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
                                         ) as s, s.get(url, allow_redirects=True) as r:
            if r.status != 200:
                raise invalid(f"{where}: fetching the image gave HTTP {r.status}", "messages")
            if r.content_length is not None and r.content_length > max_bytes:
                raise invalid(f"{where}: the image is {r.content_length} bytes, over the "
                              f"limit of {max_bytes}", "messages")
            data = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise invalid(f"{where}: the image is over the limit of {max_bytes} "
                                  "bytes", "messages")
            return bytes(data)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise invalid(f"{where}: the image could not be fetched ({type(e).__name__})",
                      "messages") from None


async def _source(ref: str, i: int, opts: dict[str, Any], max_bytes: int) -> str | bytes:
    """What to decode for the request's i-th image: its bytes, or base64 text."""
    where = f"image {i + 1}"
    if ref.startswith("data:"):
        return ref
    if _REMOTE.match(ref):
        if not opts.get("allow_remote_images"):
            raise invalid(f"{where} is an http(s) URL: this server fetches no URLs a prompt "
                          "names unless the model's settings allow it "
                          "(llm.allow_remote_images); send the image as a data: URL",
                          "messages")
        return await _fetch(ref, max_bytes, where)
    if _OTHER_SCHEME.match(ref):
        raise invalid(f"{where}: URLs of that scheme are not fetched; send a data: URL",
                      "messages")
    if opts.get("allow_local_images") and len(ref) < 4096 and "\0" not in ref:
        path = os.path.expanduser(ref)
        if os.path.isfile(path):
            def read() -> bytes:
                if os.path.getsize(path) > max_bytes:
                    raise invalid(f"{where}: the file is over the limit of {max_bytes} bytes",
                                  "messages")
                with open(path, "rb") as f:
                    return f.read()
            return await asyncio.to_thread(read)
    return ref  # base64 without a data: prefix (Ollama's form); refused if it is not


def _decode(data: str | bytes, i: int, max_bytes: int, max_pixels: int, low: bool
            ) -> np.ndarray:
    img = image_mod.to_rgb(image_mod.decode_image(data, f"image {i + 1}", max_bytes,
                                                  max_pixels))
    if low and max(img.size) > LOW_DETAIL_SIDE:  # OpenAI's detail "low": a small image
        img.thumbnail((LOW_DETAIL_SIDE, LOW_DETAIL_SIDE))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


async def load_images(lm: LoadedModel, model: str, refs: list[tuple[str, bool]]
                      ) -> list[np.ndarray]:
    """The request's images as uint8 [H, W, 3] arrays, in order; every failure is a client
    error naming the image."""
    opts = check_model(lm, model, len(refs))
    max_bytes = int(opts.get("max_image_bytes") or image_mod.MAX_INPUT_BYTES)
    max_pixels = int(opts.get("max_image_pixels") or image_mod.MAX_INPUT_PIXELS)
    sources = [await _source(url, i, opts, max_bytes) for i, (url, _low) in enumerate(refs)]

    def decode_all() -> list[np.ndarray]:
        return [_decode(s, i, max_bytes, max_pixels, refs[i][1])
                for i, s in enumerate(sources)]

    try:
        return await asyncio.to_thread(decode_all)
    except Exception as e:
        if hasattr(e, "code"):
            # decode_image names the field "image N"; here it is part of the messages
            e.param = "messages"  # type: ignore[attr-defined]
        raise


def image_tokens(folder: Path) -> int:
    """About how many prompt tokens an image takes, from the model's config.json (LLaVA's
    image_seq_length); 0 when it does not say (the engine's own count is exact)."""
    config = read_json(folder / "config.json")
    n = config.get("image_seq_length") or config.get("num_image_tokens") or 0
    return int(n) if isinstance(n, int) and n > 0 else 0
