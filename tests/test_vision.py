"""Images in chat on a tiny random-weight vision-language model (LLaVA: CLIP tower and a
tiny Qwen2) converted by the real pull path: greedy answers through the plugin equal
VLMPipeline's on the same image and prompt, unary and streamed, over AOG and HTTP
(OpenAI's image_url parts, Ollama's images); concurrent image chats on the
continuous-batching engine; and every refusal."""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest
import yaml
from conftest import CHAT
from PIL import Image
from test_http import KEY, Server

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore

VLM = "vlm"
PROMPT = "What is in the picture?"


def picture(seed: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_url(arr: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png(arr)).decode()


def image_part(arr: np.ndarray) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(arr)}}


def chat(*parts: dict | str, **kw) -> dict:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"model": VLM, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 8, "ignore_eos": True, **kw}


@pytest.fixture(scope="module")
def vision_home(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    src = devmodels.ensure_models(devmodels.default_cache_dir(),
                                  [devmodels.TINY_VLM_HF])[devmodels.TINY_VLM_HF]
    home = tmp_path_factory.mktemp("vision-home")
    store = ModelStore(home / "models")
    pull.pull(store, pull.PullRequest(model=str(src), name=VLM, model_type="chat"),
              lambda m: None)
    pull.pull(store, pull.PullRequest(model=str(test_models[CHAT]), name=CHAT),
              lambda m: None)
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {
        VLM: {"scheduler": {"cache_size": 1}, "llm": {"max_images": 3,
                                                      "max_image_bytes": 100_000}},
        CHAT: {"scheduler": {"cache_size": 1}}}}))
    return home


@pytest.fixture(scope="module")
def vhost(plugin_dir: Path, vision_home: Path) -> Iterator[AogHost]:
    h = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(vision_home)}).start()
    yield h
    h.kill()


@pytest.fixture(scope="module")
def direct(vision_home: Path):
    path = ModelStore(vision_home / "models").find(VLM).path
    pipe = ov_genai.VLMPipeline(str(path), "CPU", INFERENCE_PRECISION_HINT="f32")

    def run(prompt: str, *images: np.ndarray) -> str:
        gc = ov_genai.GenerationConfig(max_new_tokens=8, ignore_eos=True, do_sample=False)
        return pipe.generate(prompt, images=[ov.Tensor(i) for i in images],
                             generation_config=gc).texts[0]
    return run


def answer(host: AogHost, body: dict) -> str:
    r = host.invoke("chat", body, timeout=120)
    assert r.code == 0, r.message + "\n".join(host.stderr_lines[-30:])
    out = json.loads(r.response_data)
    assert out["choices"][0]["finish_reason"] == "length"
    return out["choices"][0]["message"]["content"]


def test_pulled_as_a_chat_model(vision_home: Path):
    entry = ModelStore(vision_home / "models").find(VLM)
    assert entry.task == "text-generation" and "chat" in entry.services
    assert (entry.path / "openvino_vision_embeddings_model.xml").is_file()
    assert (entry.path / "preprocessor_config.json").is_file()  # GenAI reads it


def test_greedy_answer_equals_the_pipelines(vhost: AogHost, direct):
    img = picture(1)
    got = answer(vhost, chat(image_part(img), PROMPT))
    assert got == direct(PROMPT, img)
    # Streamed over AOG: the same text.
    reader = SseReader(vhost.invoke_stream("chat", {**chat(image_part(img), PROMPT),
                                                    "stream": True}))
    events = list(reader.events())
    assert reader.error is None
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == got
    # Two images, in order; and a text-only question to the same model.
    a, b = picture(2), picture(3, (64, 32))
    assert answer(vhost, chat(image_part(a), image_part(b), PROMPT)) == direct(PROMPT, a, b)
    assert answer(vhost, chat(PROMPT)) == direct(PROMPT)


def test_concurrent_image_chats_share_the_engine(vhost: AogHost, direct):
    """Four different images with the same question at once: each answer is its own
    (the engine's prefix cache must not mix images up)."""
    imgs = [picture(10 + i) for i in range(4)]
    want = [direct(PROMPT, img) for img in imgs]
    assert len(set(want)) > 1  # the images make a difference
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda img: answer(vhost, chat(image_part(img), PROMPT)), imgs))
    assert got == want


def _tiff() -> str:
    return "data:image/tiff;base64," + base64.b64encode(
        b"II*\x00" + struct.pack("<I", 8) + b"\x00" * 64).decode()


@pytest.mark.parametrize(("body", "needle"), [
    (chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                               + base64.b64encode(b"not a picture").decode()}},
          PROMPT), "image 1' is not an image"),
    (chat({"type": "image_url", "image_url": {"url": _tiff()}}, PROMPT), "TIFF"),
    (chat(*[image_part(picture(i)) for i in range(4)], PROMPT), "over model 'vlm''s limit of 3"),
    (chat(image_part(picture(5, (300, 300))), PROMPT), "too large"),
    (chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, PROMPT),
     "llm.allow_remote_images"),
    (chat({"type": "image_url", "image_url": {"url": "/etc/hostname"}}, PROMPT),
     "not valid base64"),
    (chat("look: <ov_genai_image_0>"), "marks images"),
    ({**chat(image_part(picture(1)), PROMPT), "model": CHAT}, "text-only model"),
])
def test_refusals(vhost: AogHost, body: dict, needle: str):
    r = vhost.invoke("chat", body, timeout=120)
    assert r.code != 0 and needle in r.message, r.message


# --- HTTP: OpenAI's parts and Ollama's images -----------------------------------------

@pytest.fixture(scope="module")
def vsrv(vision_home: Path) -> Iterator[Server]:
    with Server.ready(vision_home, ["--port", "0", "--idle-unload", "0", "--max-body-mb", "4"],
                      env={"OVMS_PLUGIN_API_KEY": KEY}) as s:
        yield s


def test_openai_and_ollama_clients(vsrv: Server, direct):
    import ollama
    img = picture(7)
    want = direct(PROMPT, img)
    out = vsrv.openai().chat.completions.create(
        model=VLM, messages=chat(image_part(img), PROMPT)["messages"], temperature=0,
        max_tokens=8, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want
    client = ollama.Client(host=vsrv.url, headers={"Authorization": f"Bearer {KEY}"})
    options = {"temperature": 0, "num_predict": 8}
    # Ollama stops at the model's end token; ignore_eos is not an Ollama option, so
    # compare with the same request through the OpenAI route.
    plain = vsrv.openai().chat.completions.create(
        model=VLM, messages=chat(image_part(img), PROMPT)["messages"], temperature=0,
        max_tokens=8)
    got = client.chat(model=VLM, options=options, messages=[
        {"role": "user", "content": PROMPT, "images": [base64.b64encode(png(img)).decode()]}])
    assert got.message.content == plain.choices[0].message.content
    gen = client.generate(model=VLM, prompt=PROMPT, options=options,
                          images=[base64.b64encode(png(img)).decode()])
    assert gen.response == plain.choices[0].message.content
