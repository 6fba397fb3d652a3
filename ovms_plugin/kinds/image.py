"""Text-to-image and image-to-image (editing, inpainting with a mask): Text2ImagePipeline,
Image2ImagePipeline and InpaintingPipeline sharing one model, one request at a time,
progress per denoising step (engine/image.py)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.engine.requests import ImageJob, ImageProgress, ImageResult  # noqa: F401 (this kind's)
from ovms_plugin.kinds.base import Kind, Service, StreamChunk
from ovms_plugin.service import errors
from ovms_plugin.service import image as image_mod
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.settings import option

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry


@dataclass(frozen=True)
class ImageOptions:
    """settings.yaml's `image:` section (globally or in a model's)."""

    min_size: int | None = option(None, "the smallest side accepted, in pixels (default: "
                                        "an eighth of the model's native side)", minimum=1)
    max_size: int | None = option(None, "the largest side accepted, in pixels (default: "
                                        "twice the native side, at most 4096)", minimum=1)
    static_size: str | None = option(None, "WIDTHxHEIGHT compiled in, the only size served "
                                           "(default: the native size on the NPU only)")
    static_n: int = option(1, "with static_size: images per request", minimum=1)
    static_guidance_scale: float = option(7.5, "with static_size: the guidance scale",
                                          minimum=0)
    max_input_pixels: int = option(image_mod.MAX_INPUT_PIXELS, "image-to-image: the most "
                                   "pixels an image (or mask) sent may have", minimum=1)
    max_input_bytes: int = option(image_mod.MAX_INPUT_BYTES, "image-to-image: the largest "
                                  "image (or mask) file accepted, in bytes", minimum=1)

    def __post_init__(self) -> None:
        if self.static_size is not None and \
                not re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", self.static_size):
            raise ValueError(f"static_size must be WIDTHxHEIGHT like 512x512, got "
                             f"{self.static_size!r}")
        if self.min_size and self.max_size and self.min_size > self.max_size:
            raise ValueError(f"min_size must not be over max_size, got {self.min_size} and "
                             f"{self.max_size}")


async def _outputs(rt: Runtime, lm: Any, job: ImageJob) -> AsyncIterator[tuple[str, Any]]:
    async with aclosing(rt.submit(lm, job)) as outputs:
        async for out in outputs:
            if out.finish is None:
                yield "progress", out.result
            else:
                yield "images", out.result.images
                return


async def run(rt: Runtime, req: image_mod.ImageRequest) -> AsyncIterator[tuple[str, Any]]:
    """Yields ("progress", ImageProgress) per denoising step, then ("images", [png])."""
    async with rt.lease(req.model, "text-to-image") as lm:
        limits = image_mod.ImageLimits.of(lm.entry.path, lm.settings.options["image"])
        job = ImageJob(**image_mod.resolve(req, limits, lm.client.info.get("defaults", {}),
                                           lm.client.info.get("static")))
        async with aclosing(_outputs(rt, lm, job)) as events:
            async for event in events:
                yield event


async def run_edit(rt: Runtime, req: image_mod.EditRequest) -> AsyncIterator[tuple[str, Any]]:
    """image-to-image: the image (and mask) decoded off the event loop, checked against
    the model, then the same events as run()."""
    async with rt.lease(req.base.model, "image-to-image") as lm:
        info = lm.client.info
        if not info.get("edit"):
            raise errors.invalid(f"model {req.base.model!r} cannot edit images: its pipeline "
                                 "has no VAE encoder (or no image-to-image support); use a "
                                 "diffusion model exported with its vae_encoder", "model")
        options = lm.settings.options["image"]
        limits = image_mod.ImageLimits.of(lm.entry.path, options)
        image, mask = await asyncio.to_thread(
            image_mod.decode_edit, req,
            int(options.get("max_input_bytes") or image_mod.MAX_INPUT_BYTES),
            int(options.get("max_input_pixels") or image_mod.MAX_INPUT_PIXELS))
        payload = image_mod.resolve_edit(req, image.size, limits, info.get("defaults", {}),
                                         info["edit"], info.get("static"))
        pixels, mask_pixels = await asyncio.to_thread(
            image_mod.edit_arrays, image, mask, payload["width"], payload["height"])
        del image, mask
        job = ImageJob(**payload, image=pixels, mask=mask_pixels)
        async with aclosing(_outputs(rt, lm, job)) as events:
            async for event in events:
                yield event


def _events(rt: Runtime, service: str, body: Any) -> AsyncIterator[tuple[str, Any]]:
    if service == "image-to-image":
        return run_edit(rt, image_mod.parse_edit(body))
    return run(rt, image_mod.parse(body))


async def unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    async with aclosing(_events(rt, service, body)) as events:
        async for kind, data in events:
            if kind == "images":
                return image_mod.response(data)
    raise ServiceError("the image engine returned no image", errors.INTERNAL)


async def stream(rt: Runtime, service: str, body: Any) -> AsyncIterator[StreamChunk]:
    async with aclosing(_events(rt, service, body)) as events:
        async for kind, data in events:
            if kind == "progress":
                yield StreamChunk(image_mod.progress_event(data.step, data.steps))
            else:
                yield StreamChunk(image_mod.response(data), final=True)


def _smallest_side(folder: Path) -> int:
    """A small valid image side: 8 latent pixels times the VAE's scale factor."""
    try:
        vae = json.loads((folder / "vae_decoder" / "config.json").read_text())
        scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    except (OSError, ValueError):
        scale = 8
    return 8 * scale


class ImageKind(Kind):
    name = "image"
    task = "text-to-image"
    services = (Service("text-to-image", unary, stream, task_type="text-to-image",
                        timeout=-1, default_model="stable-diffusion-v1.5",
                        # AOG reads one JSON body for images; the progress stream is for
                        # direct callers.
                        aog_streaming=False),
                # The same models edit images (with a mask: inpainting); task_type
                # text-to-image so that AOG offers the models pulled for text-to-image.
                Service("image-to-image", unary, stream, task_type="text-to-image",
                        timeout=-1, default_model="stable-diffusion-v1.5",
                        aog_streaming=False))
    required_files = ("model_index.json",)
    options_section = "image"
    options_type = ImageOptions
    device_preference = ("GPU.discrete", "GPU.integrated", "CPU")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        return 0 if "model_index.json" in files else None  # diffusers

    def is_native(self, files: set[str]) -> bool:
        # A diffusers pipeline keeps one IR per component folder.
        return "model_index.json" in files and \
            any(f.count("/") == 1 and f.endswith("/openvino_model.xml") for f in files)

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        import openvino_genai as ov_genai
        pipe = ov_genai.Text2ImagePipeline(str(folder), "CPU")
        side = _smallest_side(folder)
        pipe.generate("a test", width=side, height=side, num_inference_steps=1)
        return {"smallest_side": side}

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.image import ImageEngine
        return ImageEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        config = dict(ms.options["image"])
        if device.startswith("NPU"):
            native = image_mod.ImageLimits.of(entry.path, {}).default_side
            config.setdefault("static_size", f"{native}x{native}")
        return {"image": config}

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        out.counter("image_images_total", "Images generated.", labels, m.get("images_total"))
        out.counter("image_steps_total", "Denoising steps run.", labels, m.get("steps_total"))
        out.gauge("image_queued_requests", "Image requests waiting.", labels,
                  m.get("queued_requests"))


KIND = ImageKind()
