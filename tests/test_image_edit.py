"""image-to-image through the plugin, on the text-to-image model: the output size, same seed
same bytes, strength, inpainting with a mask, progress events, cancellation mid-way, every
validation error (hostile images included), and the standalone server's /v1/images/edits
through the openai client and its AOG route."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import yaml
from PIL import Image
from test_http import KEY, Server

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost, SseReader

SD = "tiny-sd"
MAX_PIXELS = 200 * 200  # settings.yaml's image.max_input_pixels here
MAX_BYTES = 300_000


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def picture(width: int = 96, height: int = 64) -> Image.Image:
    """A smooth gradient (the VAE keeps some of it)."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 2 % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def left_half_mask(width: int = 64, height: int = 64) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[:, : width // 2] = 255  # white: repaint
    return Image.fromarray(m)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMAGE = _png(picture())
SQUARE = _png(picture(64, 64))


@pytest.fixture(scope="module")
def edit_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny diffusion model copied into a store (its manifest is written on first
    sight), with small input limits to test against."""
    home = tmp_path_factory.mktemp("edit-home")
    sd = devmodels.ensure_models(devmodels.default_cache_dir(), [SD])[SD]
    shutil.copytree(sd, home / "models" / SD)
    (home / "settings.yaml").write_text(yaml.safe_dump({
        "max_waiting_requests": 2,
        "image": {"max_input_pixels": MAX_PIXELS, "max_input_bytes": MAX_BYTES}}))
    return home


@pytest.fixture(scope="module")
def ehost(plugin_dir: Path, edit_home: Path) -> Iterator[AogHost]:
    h = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(edit_home)}).start()
    assert h.json_call("LoadModel", {"model": SD}).code == 0
    yield h
    h.kill()


def edit(host: AogHost, image: bytes = IMAGE, **body) -> list[np.ndarray]:
    r = host.invoke("image-to-image", {"model": SD, "prompt": "a red cat", "image": b64(image),
                                       "num_inference_steps": 4, **body}, timeout=120)
    assert r.code == 0, r.message
    data = json.loads(r.response_data)
    assert isinstance(data["created"], int) and data["data"]
    out = []
    for d in data["data"]:
        img = Image.open(io.BytesIO(base64.b64decode(d["b64_json"], validate=True)))
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        out.append(np.asarray(img))
    return out


def steps_total(host: AogHost) -> int:
    models = json.loads(host.call("GetRunningModels").response_json)["models"]
    return next(m for m in models if m["name"] == SD)["details"]["metrics"]["steps_total"]


def test_the_output_has_the_input_size_or_the_size_asked(ehost: AogHost):
    [out] = edit(ehost)
    assert out.shape == (64, 96, 3)  # the input image's size, a multiple of 8 already
    # A data: URL, an odd size (rounded down to the VAE multiple), two images, a size.
    odd = _png(picture(100, 70), "JPEG")
    r = ehost.invoke("image-to-image", {"model": SD, "prompt": "x", "num_inference_steps": 2,
                                        "image": "data:image/jpeg;base64," + b64(odd)})
    assert r.code == 0, r.message
    [d] = json.loads(r.response_data)["data"]
    assert Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size == (96, 64)
    outs = edit(ehost, size="64x64", n=2)
    assert [o.shape for o in outs] == [(64, 64, 3)] * 2


def test_same_seed_same_image_and_strength_matters(ehost: AogHost):
    a = edit(ehost, seed=7, strength=0.5)
    b = edit(ehost, seed=7, strength=0.5)
    c = edit(ehost, seed=7, strength=1.0)
    d = edit(ehost, seed=8, strength=0.5)
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def test_inpainting_repaints_the_white_of_the_mask(ehost: AogHost):
    """The tiny model's weights are random, so the checks are statistical. Outside the
    mask the pipeline keeps the input image's latents, so the result there hardly depends
    on the seed (only through the VAE decoder's reach across the mask's edge); inside, the
    latents are new noise denoised, different with each seed."""
    body = {"size": "64x64", "strength": 1.0, "mask": b64(_png(left_half_mask()))}
    [a] = edit(ehost, SQUARE, seed=1, **body)
    [b] = edit(ehost, SQUARE, seed=2, **body)
    a, b = a.astype(int), b.astype(int)
    inside, outside = np.s_[:, :28], np.s_[:, 36:]  # a margin around the mask's edge
    seeds_in = np.abs(a - b)[inside].mean()
    seeds_out = np.abs(a - b)[outside].mean()
    assert seeds_in > 3 * seeds_out, (seeds_in, seeds_out)
    # Against the input image (a sanity check only: the random VAE's round trip is far
    # from the input anywhere): the repainted part moved at least about as far.
    src = np.asarray(Image.open(io.BytesIO(SQUARE))).astype(int)
    for out in (a, b):
        moved_in, moved_out = np.abs(out - src)[inside].mean(), np.abs(out - src)[outside].mean()
        assert moved_in >= 0.9 * moved_out, (moved_in, moved_out)


def test_progress_events_then_the_image(ehost: AogHost):
    reader = SseReader(ehost.invoke_stream("image-to-image", {
        "model": SD, "prompt": "steps", "image": b64(IMAGE), "num_inference_steps": 8,
        "strength": 0.5, "stream": True}))
    events = list(reader.events())
    assert reader.error is None
    progress = [e for e in events if e.get("object") == "image.generation.progress"]
    # strength 0.5 of 8 steps: the pipeline runs the last 4.
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert all(e["total_steps"] == 4 for e in progress)
    assert events[-1]["data"][0]["b64_json"] and len(events) == 5


def test_cancel_mid_edit_frees_the_engine(ehost: AogHost):
    call = ehost.invoke_stream("image-to-image", {
        "model": SD, "prompt": "long", "image": b64(_png(picture(128, 128))),
        "mask": b64(_png(left_half_mask(128, 128))), "num_inference_steps": 150,
        "strength": 1.0, "stream": True})
    before = steps_total(ehost)
    for msg in call:
        if b'"step": 3' in msg.chunk_data:
            break
    call.cancel()
    edit(ehost, size="64x64", num_inference_steps=2)  # served: the worker is free
    assert steps_total(ehost) - before < 150 - 100


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("body,needle,param", [
    ({"image": None}, "'image' is required", "image"),
    ({"image": 5}, "'image' must be a string", "image"),
    ({"image": "https://example.com/cat.png"}, "fetches no URLs", "image"),
    ({"image": "data:image/png,abc"}, "without ';base64'", "image"),
    ({"image": "%%%not base64"}, "not valid base64", "image"),
    ({"image": b64(b"hello, I am text")}, "'image' is not an image", "image"),
    ({"image": b64(_png(picture(16, 16), "TIFF"))}, "TIFF image, a format not accepted",
     "image"),
    ({"image": b64(b"<svg xmlns='http://www.w3.org/2000/svg'/>")}, "SVG", "image"),
    ({"image": b64(IMAGE[: len(IMAGE) // 2])}, "truncated or corrupt", "image"),
    ({"image": b64(_bomb_png(100_000, 100_000))}, "'image' has too many pixels", "image"),
    ({"image": b64(_png(picture(256, 256)))}, "at most 40000", "image"),
    ({"image": b64(b"\x89PNG" + b"\x00" * (MAX_BYTES + 10))}, "'image' is too large", "image"),
    ({"mask": b64(_png(left_half_mask(64, 32)))}, "'mask' is 64x32 but 'image' is 96x64",
     "mask"),
    ({"mask": b64(b"GIF89a junk")}, "'mask'", "mask"),
    ({"strength": 0}, "'strength' must be a number above 0", "strength"),
    ({"strength": 1.5}, "'strength' must be a number above 0", "strength"),
    ({"strength": "high"}, "'strength' must be a number", "strength"),
    ({"strength": 0.2, "num_inference_steps": 2}, "at least 5 'num_inference_steps'",
     "strength"),
    ({"size": "60x64"}, "not a multiple of 8", "width"),
    ({"size": "4096x4096"}, "outside what model", "width"),
    ({"n": 5}, "'n' must be from 1 to 4", "n"),
    ({"prompt": ""}, "'prompt' must be a non-empty", "prompt"),
    ({"response_format": "url"}, "b64_json", "response_format"),
])
def test_validation_errors(ehost: AogHost, body: dict, needle: str, param: str):
    r = ehost.invoke("image-to-image", {"model": SD, "prompt": "x", "image": b64(IMAGE),
                                        "num_inference_steps": 2, **body})
    assert r.code == 4003 and needle in r.message, r.message
    assert param in r.message and "/tmp" not in r.message and "/root" not in r.message
    assert ehost.call("HealthCheck").code == 0


# --- the standalone server --------------------------------------------------------------


@pytest.fixture(scope="module")
def esrv(edit_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("edit-srv-home")
    sd = devmodels.ensure_models(devmodels.default_cache_dir(), [SD])[SD]
    shutil.copytree(sd, home / "models" / SD)
    shutil.copy(edit_home / "settings.yaml", home / "settings.yaml")
    with Server.ready(home, ["--port", "0", "--idle-unload", "0"],
                      env={"OVMS_PLUGIN_API_KEY": KEY}) as s:
        yield s


def test_openai_images_edit(esrv: Server):
    client = esrv.openai()
    out = client.images.edit(
        model=SD, image=("in.png", SQUARE, "image/png"), prompt="a red cat",
        mask=("mask.png", _png(left_half_mask()), "image/png"), n=2, size="64x64",
        response_format="b64_json",
        extra_body={"num_inference_steps": "2", "seed": 3, "strength": "0.9"})
    assert len(out.data) == 2
    sizes = {Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in out.data}
    assert sizes == {(64, 64)}
    # The same request as the JSON body of AOG's route on the same server.
    r = esrv.http.post("/aog/v0.2/services/image-to-image", json={
        "prompt": "a red cat", "image": b64(IMAGE), "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size \
        == (96, 64)


@pytest.mark.parametrize("kwargs,needle", [
    ({"image": [("a.png", SQUARE), ("b.png", SQUARE)]}, "edits one image per request"),
    ({"response_format": "url"}, "b64_json"),
    ({"extra_body": {"num_inference_steps": "many"}}, "'num_inference_steps' must be an "
                                                       "integer"),
    ({"extra_body": {"strength": "strong"}}, "'strength' must be a number"),
    ({"image": ("x.txt", b"not an image")}, "'image' is not an image"),
])
def test_openai_edit_errors(esrv: Server, kwargs: dict, needle: str):
    args = {"model": SD, "image": ("in.png", SQUARE, "image/png"), "prompt": "x",
            "size": "64x64", **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        esrv.openai().images.edit(**args)
    assert needle in str(e.value), str(e.value)


def test_edits_needs_multipart(esrv: Server):
    r = esrv.http.post("/v1/images/edits", json={"model": SD, "prompt": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.text and "'image'" in r.text

