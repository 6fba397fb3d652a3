"""text-to-image through the plugin, as AOG calls it: PNGs of the right size, same seed
same bytes, every validation error, progress events, cancellation mid-generation,
queueing, a chat answered while an image is generating, and the memory check."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import CHAT, wait_for
from PIL import Image

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore

SD = "tiny-sd"


@pytest.fixture(scope="module")
def image_home(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("image-home")
    store = ModelStore(home / "models")
    sd = devmodels.ensure_models(devmodels.default_cache_dir(), [SD])[SD]
    pull.pull(store, pull.PullRequest(model=str(sd), name=SD, model_type="text-to-image"),
              lambda m: None)
    pull.pull(store, pull.PullRequest(model=str(test_models["tiny-chat"]), name=CHAT),
              lambda m: None)
    (home / "settings.yaml").write_text(yaml.safe_dump({
        "max_waiting_requests": 2, "models": {CHAT: {"scheduler": {"cache_size": 1}}}}))
    return home


@pytest.fixture(scope="module")
def ihost(plugin_dir: Path, image_home: Path):
    h = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(image_home)}).start()
    assert h.json_call("LoadModel", {"model": SD}).code == 0
    yield h
    h.kill()


def generate(host: AogHost, **body) -> list[bytes]:
    r = host.invoke("text-to-image", {"model": SD, "prompt": "a red cat", **body},
                    timeout=120)
    assert r.code == 0, r.message
    data = json.loads(r.response_data)
    assert isinstance(data["created"], int) and data["data"]
    return [base64.b64decode(d["b64_json"], validate=True) for d in data["data"]]


def running_details(host: AogHost) -> dict:
    models = json.loads(host.call("GetRunningModels").response_json)["models"]
    return next(m for m in models if m["name"] == SD)["details"]


def image_metrics(host: AogHost) -> dict:
    return running_details(host)["metrics"]


def test_an_image_as_aog_asks_for_it(ihost: AogHost):
    [png] = generate(ihost, size="64x64", num_inference_steps=2, rng_seed=42)
    img = Image.open(io.BytesIO(png))
    img.load()  # a whole, valid PNG
    assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"


def test_sizes_n_and_aog_client_size_syntax(ihost: AogHost):
    pngs = generate(ihost, size="128*64", num_inference_steps=1, n=2)
    assert [Image.open(io.BytesIO(p)).size for p in pngs] == [(128, 64), (128, 64)]


def test_same_seed_same_image(ihost: AogHost):
    body = {"size": "64x64", "num_inference_steps": 2}
    a = generate(ihost, seed=7, **body)
    b = generate(ihost, seed=7, **body)
    c = generate(ihost, seed=8, **body)
    assert a == b and a != c


def test_defaults_come_from_the_model(ihost: AogHost):
    [png] = generate(ihost, num_inference_steps=1)  # no size: the model's own default
    assert Image.open(io.BytesIO(png)).size == (64, 64)


@pytest.mark.parametrize("body,needle", [
    ({"size": "big"}, "must look like 512x512"),
    ({"size": "60x64"}, "not a multiple of 8"),
    ({"size": "4096x4096"}, "outside what model"),
    ({"size": "0x64"}, "outside what model"),
    ({"num_inference_steps": 0}, "'num_inference_steps' must be from 1"),
    ({"num_inference_steps": 10000}, "'num_inference_steps' must be from 1 to 150"),
    ({"n": 0}, "'n' must be from 1 to 4"),
    ({"n": 5}, "'n' must be from 1 to 4"),
    ({"prompt": "  "}, "'prompt' must be a non-empty"),
    ({"response_format": "url"}, "b64_json"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -5}, "seed"),
])
def test_validation_errors(ihost: AogHost, body: dict, needle: str):
    r = ihost.invoke("text-to-image", {"model": SD, "prompt": "x", **body})
    assert r.code == 4003 and needle in r.message, r.message
    assert ihost.call("HealthCheck").code == 0


def test_progress_events_then_the_image(ihost: AogHost):
    reader = SseReader(ihost.invoke_stream("text-to-image", {
        "model": SD, "prompt": "steps", "size": "64x64", "num_inference_steps": 4,
        "stream": True}))
    events = list(reader.events())
    assert reader.error is None
    progress = [e for e in events if e.get("object") == "image.generation.progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert all(e["total_steps"] == 4 for e in progress)
    assert events[-1]["data"][0]["b64_json"] and len(events) == 5


def test_cancel_mid_generation_frees_the_engine(ihost: AogHost):
    call = ihost.invoke_stream("text-to-image", {
        "model": SD, "prompt": "long", "size": "128x128", "num_inference_steps": 150,
        "stream": True})
    before = image_metrics(ihost)["steps_total"]
    for msg in call:
        if b'"step": 3' in msg.chunk_data:
            break
    call.cancel()
    # The next request is served (the worker is free), and the cancelled one ran only a
    # few of its 150 steps.
    generate(ihost, size="64x64", num_inference_steps=2)
    assert image_metrics(ihost)["steps_total"] - before < 150 - 100


def test_requests_queue_in_order_and_busy_beyond(ihost: AogHost):
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(generate, ihost, size="64x64", num_inference_steps=30, seed=s)
                   for s in (1, 2)]
        assert all(len(f.result()) == 1 for f in futures)
    # One running plus max_waiting_requests (2) waiting: a fourth is refused, clearly.
    body = {"model": SD, "prompt": "busy", "size": "128x128", "num_inference_steps": 150,
            "stream": True}
    calls = [ihost.invoke_stream("text-to-image", body) for _ in range(3)]
    assert next(iter(calls[0])).code == 0  # running
    assert wait_for(lambda: running_details(ihost)["in_flight"] == 3)
    assert image_metrics(ihost)["steps_total"] > 0  # answered while the engine is busy
    r = ihost.invoke("text-to-image", {**body, "stream": False})
    assert r.code == 6 and "busy" in r.message
    for c in calls:
        c.cancel()


def test_chat_is_served_while_an_image_generates(ihost: AogHost):
    call = ihost.invoke_stream("text-to-image", {
        "model": SD, "prompt": "slow", "size": "128x128", "num_inference_steps": 150,
        "stream": True})
    it = iter(call)
    next(it)
    steps_before = image_metrics(ihost)["steps_total"]
    r = ihost.invoke("chat", {"model": CHAT, "max_tokens": 8,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert r.code == 0, r.message
    steps_after = image_metrics(ihost)["steps_total"]
    assert steps_after > steps_before  # the image kept going meanwhile
    call.cancel()


def test_a_model_that_cannot_fit_is_refused(plugin_dir: Path, image_home: Path):
    host = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(image_home),
                                    "OVMS_PLUGIN_MEMORY_BUDGET": "1MB"}).start()
    try:
        r = host.json_call("LoadModel", {"model": SD})
        assert r.code == 6 and "not enough memory to load model 'tiny-sd'" in r.message
        assert "needs about" in r.message and "available" in r.message
    finally:
        host.kill()
