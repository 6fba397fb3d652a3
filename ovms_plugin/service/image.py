"""text-to-image: request parsing and validation against the model's own limits, and the
OpenAI images response shape."""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovms_plugin.service.errors import int_field, invalid, require_model
from ovms_plugin.store.store import read_json

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
