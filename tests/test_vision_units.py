"""Where a chat's images come from, without a model: data URLs and base64 as they are;
files and http(s) URLs only when the model's settings allow, fetched from loopback here
within the byte limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from ovms_plugin.service import vision
from ovms_plugin.service.errors import ServiceError

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


async def _serve(body: bytes) -> tuple[web.AppRunner, str]:
    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", picture)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_remote_images_only_when_allowed_and_within_the_limit():
    async def run() -> None:
        runner, base = await _serve(PNG)
        try:
            with pytest.raises(ServiceError, match=r"llm\.allow_remote_images"):
                await vision._source(f"{base}/cat.png", 0, {}, 1000)
            allowed = {"allow_remote_images": True}
            assert await vision._source(f"{base}/cat.png", 0, allowed, 1000) == PNG
            with pytest.raises(ServiceError, match="over the limit of 50"):
                await vision._source(f"{base}/cat.png", 0, allowed, 50)
            with pytest.raises(ServiceError, match="HTTP 404"):
                await vision._source(f"{base}/dog.png", 1, allowed, 1000)
            with pytest.raises(ServiceError, match="scheme"):
                await vision._source("file:///etc/passwd", 0, allowed, 1000)
        finally:
            await runner.cleanup()

    asyncio.run(run())


def test_local_files_only_when_allowed(tmp_path: Path):
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)

    async def run() -> None:
        # Not allowed: the path is taken for base64 (and fails to decode as an image later).
        assert await vision._source(str(path), 0, {}, 1000) == str(path)
        assert await vision._source(str(path), 0, {"allow_local_images": True}, 1000) == PNG
        with pytest.raises(ServiceError, match="over the limit"):
            await vision._source(str(path), 0, {"allow_local_images": True}, 10)
        url = "data:image/png;base64,AAAA"
        assert await vision._source(url, 0, {}, 1000) == url

    asyncio.run(run())


def test_image_detail_low_makes_a_small_image_and_unknown_details_are_refused():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from ovms_plugin.service import text
    buf = io.BytesIO()
    Image.fromarray(np.zeros((600, 900, 4), np.uint8)).save(buf, "PNG")  # transparent
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}]}
    req = text.parse("chat", body)
    assert [low for _url, low in req.images] == [True, False]
    small = vision._decode(url, 0, 10**7, 10**7, True)
    full = vision._decode(url, 1, 10**7, 10**7, False)
    assert small.shape == (341, 512, 3) and full.shape == (600, 900, 3)
    assert (full == 255).all()  # transparency on white
    body["messages"][0]["content"][0]["image_url"]["detail"] = "medium"
    with pytest.raises(ServiceError, match="detail must be auto, high or low"):
        text.parse("chat", body)
