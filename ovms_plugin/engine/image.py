"""Text-to-image engine (runs inside a worker process): openvino_genai's
Text2ImagePipeline, one image request at a time, the rest waiting in order.

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
            self.pipe = ov_genai.Text2ImagePipeline(str(model_dir))
            self.pipe.reshape(self.static["n"], height, width, self.static["guidance_scale"])
            self.pipe.compile(self.device, **config.get("properties", {}))
        else:
            self.pipe = ov_genai.Text2ImagePipeline(str(model_dir), self.device,
                                                    **config.get("properties", {}))
        self.load_seconds = time.monotonic() - started
        self.images_total = 0
        self.steps_total = 0
        log.info("loaded %s on %s in %.2fs", model_dir, self.device, self.load_seconds)

    def info(self) -> dict[str, Any]:
        gc = self.pipe.get_generation_config()
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version(),
                "defaults": {"width": gc.width, "height": gc.height,
                             "steps": gc.num_inference_steps,
                             "guidance_scale": gc.guidance_scale},
                "static": self.static}

    def step(self) -> list[StepOutput]:
        req_id, p = self.queue.popleft()
        assert isinstance(p, ImageJob)
        if self.take_interrupt(req_id):
            return []
        steps = int(p.steps)

        def on_step(step: int, num_steps: int, latent: Any) -> bool:
            self.steps_total += 1
            self.emit([StepOutput(req_id, ImageProgress(step + 1, num_steps))])
            return self.is_interrupted(req_id)  # True stops the denoising loop

        kwargs: dict[str, Any] = {
            "width": int(p.width), "height": int(p.height), "num_inference_steps": steps,
            "num_images_per_prompt": int(p.n),
            "generator": ov_genai.TorchGenerator(int(p.seed)), "callback": on_step}
        if p.guidance_scale is not None:
            kwargs["guidance_scale"] = float(p.guidance_scale)
        if p.negative_prompt:
            kwargs["negative_prompt"] = p.negative_prompt
        tensor = self.pipe.generate(p.prompt, **kwargs)
        if self.take_interrupt(req_id):
            return []  # the caller is gone; the engine is free for the next one
        images = np.asarray(tensor.data)
        pngs = [encode_rgb(np.ascontiguousarray(img)) for img in images]
        self.images_total += len(pngs)
        return [StepOutput(req_id, ImageResult(pngs), "stop")]

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "images_total": self.images_total,
                "steps_total": self.steps_total}
