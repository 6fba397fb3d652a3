"""text-to-image and image-to-image: request parsing and validation against the model's own
limits, decoding the images sent (hostile input: formats, sizes and decompression bombs
checked before decoding), and the OpenAI images response shape."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.service.errors import int_field, invalid, require_model
from ovms_plugin.store.store import read_json

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

MAX_STEPS = 150
MAX_IMAGES = 4
_SIZE = re.compile(r"^\s*(\d+)\s*[x*×X]\s*(\d+)\s*$")


@dataclass
class ImageRequest:
    model: str
    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    n: int = 1
    seed: int = 42
    guidance_scale: float | None = None
    negative_prompt: str | None = None


@dataclass
class ImageLimits:
    """What a diffusion model accepts: sides in multiples of `multiple`, within bounds."""

    multiple: int
    min_side: int
    max_side: int
    default_side: int

    @classmethod
    def of(cls, folder: Path, options: dict[str, Any]) -> ImageLimits:
        vae = read_json(folder / "vae_decoder" / "config.json")
        scale = 2 ** (len(vae.get("block_out_channels") or [0, 0, 0, 0]) - 1)
        unet = read_json(folder / "unet" / "config.json") or \
            read_json(folder / "transformer" / "config.json")
        native = int(unet.get("sample_size") or 64) * scale
        return cls(multiple=scale, default_side=native,
                   min_side=int(options.get("min_size") or max(scale, native // 8)),
                   max_side=int(options.get("max_size") or min(4096, native * 2)))


def parse(body: Any) -> ImageRequest:
    model = require_model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("'prompt' must be a non-empty string describing the image", "prompt")
    req = ImageRequest(model=model, prompt=prompt)
    size = body.get("size")
    if size is not None and size != "auto":
        m = _SIZE.match(str(size))
        if not m:
            raise invalid(f"'size' must look like 512x512 (or 512*512), got {size!r}", "size")
        req.width, req.height = int(m.group(1)), int(m.group(2))
    req.steps = int_field(body, "num_inference_steps", 1, MAX_STEPS)
    req.n = int_field(body, "n", 1, MAX_IMAGES) or 1
    seed = body.get("seed", body.get("rng_seed"))
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise invalid(f"'seed' must be a non-negative integer, got {seed!r}", "seed")
        req.seed = seed
    g = body.get("guidance_scale")
    if g is not None:
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g <= 30:
            raise invalid(f"'guidance_scale' must be a number from 0 to 30, got {g!r}",
                          "guidance_scale")
        req.guidance_scale = float(g)
    neg = body.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise invalid("'negative_prompt' must be a string", "negative_prompt")
    req.negative_prompt = neg or None
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise invalid("only 'response_format': 'b64_json' is supported: images are returned "
                      "inline, this local server keeps no files to link to",
                      "response_format")
    return req


def resolve(req: ImageRequest, limits: ImageLimits, defaults: dict[str, Any],
            static: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine payload: the request checked against the model, gaps filled from the
    model's own generation defaults. A pipeline compiled with static shapes takes only
    its own size, image count and guidance."""
    if static:
        defaults = {**defaults, "width": static["width"], "height": static["height"]}
        asked = (req.width or static["width"], req.height or static["height"], req.n)
        if asked != (static["width"], static["height"], static["n"]) or (
                req.guidance_scale is not None
                and req.guidance_scale != static["guidance_scale"]):
            raise invalid(f"model {req.model!r} is compiled with static shapes: only "
                          f"{static['width']}x{static['height']}, n={static['n']}, "
                          f"guidance_scale {static['guidance_scale']}", "size")
        req.guidance_scale = static["guidance_scale"]
    default_w = int(defaults.get("width") or limits.default_side)
    default_h = int(defaults.get("height") or limits.default_side)
    width = default_w if req.width is None else req.width
    height = default_h if req.height is None else req.height
    for name, side in (("width", width), ("height", height)):
        if side % limits.multiple:
            near = max(limits.multiple, side - side % limits.multiple)
            raise invalid(f"the image {name} {side} is not a multiple of {limits.multiple} (the "
                          f"model's VAE scale); try {near}", "size")
        if not limits.min_side <= side <= limits.max_side:
            raise invalid(f"the image {name} {side} is outside what model {req.model!r} "
                          f"supports: {limits.min_side} to {limits.max_side}", "size")
    steps = req.steps if req.steps is not None else int(defaults.get("steps") or 20)
    payload: dict[str, Any] = {"prompt": req.prompt, "width": width, "height": height,
                               "steps": steps, "n": req.n, "seed": req.seed}
    if req.guidance_scale is not None:
        payload["guidance_scale"] = req.guidance_scale
    if req.negative_prompt:
        payload["negative_prompt"] = req.negative_prompt
    return payload


def response(pngs: list[bytes]) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode()} for p in pngs]}


def progress_event(step: int, steps: int) -> dict[str, Any]:
    return {"object": "image.generation.progress", "step": step, "total_steps": steps}


# --- image-to-image -------------------------------------------------------------------------

# Decoders offered to images from outside: the common web formats only.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_INPUT_PIXELS = 4096 * 4096  # the image section's max_input_pixels default
MAX_INPUT_BYTES = 20 * 2**20  # and max_input_bytes
_OTHER_FORMATS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"),
                  (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"\xff\x0a", "JPEG XL"),
                  (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"))
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)


@dataclass
class EditRequest:
    """An image-to-image request: the text-to-image fields, the image (and mask) as sent
    (base64 text, a data: URL, or bytes from a form), and the strength."""

    base: ImageRequest
    image: str | bytes
    mask: str | bytes | None = None
    strength: float | None = None


def parse_edit(body: Any) -> EditRequest:
    base = parse(body)
    req = EditRequest(base=base, image=_image_field(body, "image", required=True))
    req.mask = _image_field(body, "mask", required=False)
    strength = body.get("strength")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, int | float) or \
                not 0 < strength <= 1:
            raise invalid(f"'strength' must be a number above 0 and at most 1 (how much of "
                          f"the image is repainted; 1: all of it), got {strength!r}", "strength")
        req.strength = float(strength)
    return req


def _image_field(body: dict[str, Any], name: str, required: bool) -> str | bytes | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise invalid(f"'{name}' is required: the image to edit, base64-encoded or as a "
                          "data: URL (PNG, JPEG, WebP, BMP or GIF)", name)
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string: the image base64-encoded or as a data: URL",
                      name)
    if re.match(r"^\s*(https?|file|ftp)://", value, re.IGNORECASE):
        raise invalid(f"'{name}' must carry the image itself, base64-encoded or as a data: "
                      "URL; this server fetches no URLs", name)
    return value


def _image_bytes(data: str | bytes, name: str, max_bytes: int) -> bytes:
    if isinstance(data, bytes):
        raw = data
    else:
        text = data.strip()
        m = _DATA_URL.match(text)
        if m:
            if "base64" not in m.group(2).lower():
                raise invalid(f"'{name}' is a data: URL without ';base64'; send the image "
                              "base64-encoded (data:image/png;base64,...)", name)
            text = text[m.end():]
        if len(text) // 4 * 3 > max_bytes + 3:  # before decoding anything
            raise invalid(f"'{name}' is too large: about {len(text) // 4 * 3} bytes, at most "
                          f"{max_bytes} are accepted", name)
        try:
            raw = base64.b64decode(text)
        except (binascii.Error, ValueError):
            raise invalid(f"'{name}' is not valid base64; send the image base64-encoded or as "
                          "a data: URL (data:image/png;base64,...)", name) from None
    if len(raw) > max_bytes:
        raise invalid(f"'{name}' is too large: {len(raw)} bytes, at most {max_bytes} are "
                      "accepted", name)
    if not raw:
        raise invalid(f"'{name}' is empty; send a PNG, JPEG, WebP, BMP or GIF image", name)
    return raw


def decode_image(data: str | bytes, name: str, max_bytes: int = MAX_INPUT_BYTES,
                 max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An image sent by a client, opened and checked (format, pixel count) before its
    pixels are decoded, then decoded, upright (EXIF orientation). Blocking: call it off
    the event loop. Every failure is a client error naming the field."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    raw = _image_bytes(data, name, max_bytes)
    too_large = (f"'{name}' has too many pixels: at most {max_pixels} (for example "
                 f"{math.isqrt(max_pixels)}x{math.isqrt(max_pixels)}) are accepted; send a "
                 "smaller image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # reads the header only
        except UnidentifiedImageError:
            other = next((f for magic, f in _OTHER_FORMATS if raw.startswith(magic)), None)
            if other is None and raw[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif",
                                               b"ftypmif1", b"ftypmsf1"):
                other = "HEIF/AVIF"
            if other is None and raw.lstrip()[:5].lower() in (b"<svg ", b"<?xml"):
                other = "SVG"
            if other:
                raise invalid(f"'{name}' is a {other} image, a format not accepted; send PNG, "
                              "JPEG, WebP, BMP or GIF", name) from None
            raise invalid(f"'{name}' is not an image (or not one this server reads); send "
                          "PNG, JPEG, WebP, BMP or GIF", name) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise invalid(too_large, name) from None
        except Exception:  # a header the decoder chokes on
            raise invalid(f"'{name}' is not a readable image: its header is corrupt", name) \
                from None
        width, height = img.size
        if width < 1 or height < 1 or width * height > max_pixels:
            raise invalid(f"{too_large} (it is {width}x{height})", name)
        try:
            img.load()  # the first frame of an animation
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise invalid(too_large, name) from None
        except Exception:  # truncated, corrupt
            raise invalid(f"'{name}' could not be decoded: the {img.format} data is truncated "
                          "or corrupt", name) from None
    return img


def decode_edit(req: EditRequest, max_bytes: int, max_pixels: int
                ) -> tuple[Image.Image, Image.Image | None]:
    """The request's image and mask, decoded (blocking: call it off the event loop)."""
    image = decode_image(req.image, "image", max_bytes, max_pixels)
    mask = None
    if req.mask is not None:
        mask = decode_image(req.mask, "mask", max_bytes, max_pixels)
        if mask.size != image.size:
            raise invalid(f"'mask' is {mask.size[0]}x{mask.size[1]} but 'image' is "
                          f"{image.size[0]}x{image.size[1]}; the mask must be the image's size "
                          "(white: repaint, black: keep)", "mask")
    return image, mask


def fit_size(width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """An input image's size made one the model takes: scaled (aspect kept) into the
    model's side limits, each side rounded down to the VAE multiple."""
    m = limits.multiple
    lo = -(-limits.min_side // m) * m
    hi = max(lo, limits.max_side // m * m)
    scale = min(1.0, hi / max(width, height))
    scale = max(scale, lo / min(width, height))
    return tuple(min(hi, max(lo, int(side * scale) // m * m))  # type: ignore[return-value]
                 for side in (width, height))


def resolve_edit(req: EditRequest, size: tuple[int, int], limits: ImageLimits,
                 defaults: dict[str, Any], edit: dict[str, Any],
                 static: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine payload (without the pixels) of an image-to-image request: the output
    size defaults to the input image's, fitted to the model; the rest as text-to-image."""
    base = req.base
    if base.width is None and not static:
        base.width, base.height = fit_size(*size, limits)
    payload = resolve(base, limits, defaults, static)
    strength = req.strength if req.strength is not None else \
        float(edit["inpaint_strength" if req.mask is not None else "strength"])
    # The pipeline runs int(steps x strength) steps (in float32, as it computes them).
    import numpy as np
    if int(np.float32(strength) * np.float32(payload["steps"])) < 1:
        need = math.ceil(1 / strength)
        raise invalid(f"'strength' {strength} of {payload['steps']} denoising steps leaves "
                      f"none to run; ask for at least {need} 'num_inference_steps' or a "
                      "higher 'strength'", "strength")
    payload["strength"] = strength
    return payload


def to_rgb(image: Image.Image) -> Image.Image:
    """An image as RGB, transparency laid over white (as a viewer shows it)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def edit_arrays(image: Image.Image, mask: Image.Image | None, width: int, height: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixels the pipelines take, at the output size: the image as RGB uint8
    [height, width, 3] (transparency over white), the mask as the same shape, grey
    levels repeated over the three channels (blocking: call it off the event loop)."""
    import numpy as np
    from PIL import Image

    rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if mask is None:
        return pixels, None
    grey = mask.convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    m = np.asarray(grey, dtype=np.uint8)
    return pixels, np.ascontiguousarray(np.repeat(m[:, :, None], 3, axis=2))
