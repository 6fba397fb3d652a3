"""Image engine (runs inside a worker process): openvino_genai's Text2ImagePipeline for
text-to-image, Image2ImagePipeline and InpaintingPipeline for image-to-image, one image
request at a time, the rest waiting in order.

The three pipelines share one set of compiled models: the InpaintingPipeline is loaded
from the folder (it is the only one that can be built from the others' parts:
Text2ImagePipeline(inpainting) and Image2ImagePipeline(inpainting) reuse its text encoder,
UNet/transformer and VAE; what editing adds is the VAE encoder). A folder the inpainting
pipeline cannot load (no VAE encoder) gets a Text2ImagePipeline alone, and image-to-image
is refused for it.

requests: kinds.image.ImageJob; outputs: an ImageProgress after each denoising step (finish
None), then an ImageResult (PNG bytes) with finish "stop".
A request aborted while it runs stops at the next denoising step (the pipeline's callback
asks the reader thread's interrupt flags).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from ovms_plugin.engine.png import encode_rgb
from ovms_plugin.engine.protocol import StepOutput
from ovms_plugin.engine.queued import QueuedEngine
from ovms_plugin.engine.requests import ImageJob, ImageProgress, ImageResult

log = logging.getLogger(__name__)


class ImageEngine(QueuedEngine):
    what = "the image engine"

    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        super().__init__()
        self.device = config.get("device", "CPU")
        opts = config.get("image", {})
        started = time.monotonic()
        # Static shapes (the NPU compiles only those): one size, image count and guidance,
        # fixed at load; the front end refuses requests for anything else.
        self.static: dict[str, Any] | None = None
        if opts.get("static_size"):
            width, height = (int(x) for x in str(opts["static_size"]).lower().split("x"))
            self.static = {"width": width, "height": height, "n": int(opts.get("static_n", 1)),
                           "guidance_scale": float(opts.get("static_guidance_scale", 7.5))}
        props = config.get("properties", {})
        self.i2i: Any = None
        self.inpaint: Any = None
        try:
            self.inpaint = self._load(ov_genai.InpaintingPipeline, model_dir, props)
            self.i2i = ov_genai.Image2ImagePipeline(self.inpaint)
            self.pipe = ov_genai.Text2ImagePipeline(self.inpaint)
        except RuntimeError as e:  # no VAE encoder, or a family without inpainting
            log.warning("image editing is not available for %s: %s", model_dir,
                        (str(e).strip().splitlines() or [""])[-1])
            self.i2i = self.inpaint = None
            self.pipe = self._load(ov_genai.Text2ImagePipeline, model_dir, props)
        self.load_seconds = time.monotonic() - started
        self.images_total = 0
        self.steps_total = 0
        log.info("loaded %s on %s in %.2fs", model_dir, self.device, self.load_seconds)

    def _load(self, cls: Any, model_dir: Path, props: dict[str, Any]) -> Any:
        # Static shapes (the NPU compiles only those): reshaped before compiling.
        if self.static is None:
            return cls(str(model_dir), self.device, **props)
        pipe = cls(str(model_dir))
        pipe.reshape(self.static["n"], self.static["height"], self.static["width"],
                     self.static["guidance_scale"])
        pipe.compile(self.device, **props)
        return pipe

    def info(self) -> dict[str, Any]:
        gc = self.pipe.get_generation_config()
        edit = None
        if self.i2i is not None and self.inpaint is not None:
            edit = {"strength": round(self.i2i.get_generation_config().strength, 4),
                    "inpaint_strength": round(self.inpaint.get_generation_config().strength, 4)}
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version(),
                "defaults": {"width": gc.width, "height": gc.height,
                             "steps": gc.num_inference_steps,
                             "guidance_scale": gc.guidance_scale},
                "static": self.static, "edit": edit}

    def run(self, req_id: int, p: ImageJob) -> list[StepOutput]:
        images = self._generate(req_id, p)
        if self.is_interrupted(req_id):
            return []  # the caller is gone: no PNGs for nobody
        pngs = [encode_rgb(np.ascontiguousarray(img)) for img in images]
        self.images_total += len(pngs)
        return [StepOutput(req_id, ImageResult(pngs), "stop")]

    def _generate(self, req_id: int, p: ImageJob) -> list[np.ndarray]:
        done = 0  # steps of the images before (inpainting makes one image per call)
        rounds = 1

        def on_step(step: int, num_steps: int, latent: Any) -> bool:
            self.steps_total += 1
            self.emit([StepOutput(req_id, ImageProgress(done + step + 1, num_steps * rounds))])
            return self.is_interrupted(req_id)  # True stops the denoising loop

        kwargs: dict[str, Any] = {
            "width": int(p.width), "height": int(p.height),
            "num_inference_steps": int(p.steps), "num_images_per_prompt": int(p.n),
            "generator": ov_genai.TorchGenerator(int(p.seed)), "callback": on_step}
        if p.guidance_scale is not None:
            kwargs["guidance_scale"] = float(p.guidance_scale)
        if p.negative_prompt:
            kwargs["negative_prompt"] = p.negative_prompt
        if p.image is None:
            return list(np.asarray(self.pipe.generate(p.prompt, **kwargs).data))
        if self.i2i is None or self.inpaint is None:
            raise ValueError("this model's pipeline cannot edit images")
        if p.strength is not None:
            kwargs["strength"] = float(p.strength)
        image = ov.Tensor(np.ascontiguousarray(p.image, dtype=np.uint8)[None])
        if p.mask is None:
            return list(np.asarray(self.i2i.generate(p.prompt, image, **kwargs).data))
        mask = ov.Tensor(np.ascontiguousarray(p.mask, dtype=np.uint8)[None])
        # GenAI 2026.4's inpainting of a non-inpainting UNet makes one image per call (its
        # image latents are not repeated per image): n calls, one generator throughout.
        rounds, kwargs["num_images_per_prompt"] = int(p.n), 1
        images: list[np.ndarray] = []
        for _ in range(rounds):
            before = self.steps_total
            images.extend(np.asarray(self.inpaint.generate(p.prompt, image, mask,
                                                           **kwargs).data))
            done += self.steps_total - before
            if self.is_interrupted(req_id):
                break
        return images

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "images_total": self.images_total,
                "steps_total": self.steps_total}
