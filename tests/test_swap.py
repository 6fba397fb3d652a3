"""The store and the running models agree: a loaded model pulled again (by the plugin, or by
the CLI in another process) is swapped to the new version while requests in flight finish
on the old one; a model removed from the store stops answering; a pull never changes a
loaded model's type."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml
from conftest import wait_for
from test_aog_plugin import stream_chat
from test_pull import _pull_req

from ovms_plugin import devmodels
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def models_of(host, method: str) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(host.call(method).response_json)["models"]}


def test_a_model_replaced_or_removed_in_the_store_is_swapped_or_dropped(
        start_host, tmp_path: Path, test_models: dict[str, Path]):
    home = tmp_path / "home"
    store = ModelStore(home / "models")
    (home).mkdir()
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {"m": {
        "properties": {"INFERENCE_PRECISION_HINT": "f32"}, "scheduler": {"cache_size": 1}}}}))
    pull.pull(store, pull.PullRequest(model=str(test_models[devmodels.TINY_CHAT]), name="m"),
              lambda msg: None)
    host = start_host(home)
    assert host.json_call("LoadModel", {"model": "m"}).code == 0
    before = host.invoke("chat", {"model": "m", "messages": QUESTION, "max_tokens": 12,
                                  "temperature": 0})
    assert before.code == 0 and "Paris" not in json.loads(before.response_data)[
        "choices"][0]["message"]["content"]  # random weights

    # A long stream on the old version, while another process installs a new one.
    result: dict = {}
    streaming = threading.Thread(target=lambda: result.update(zip(
        ("text", "events", "reader"), stream_chat(host, {
            "model": "m", "messages": QUESTION, "max_tokens": 300, "ignore_eos": True,
            "temperature": 0}), strict=True)))
    streaming.start()
    assert wait_for(lambda: models_of(host, "GetRunningModels")["m"]["details"][
        "in_flight"] == 1, timeout=30)
    pull.pull(store, pull.PullRequest(model=str(test_models[devmodels.SMOLLM2]), name="m"),
              lambda msg: None)  # what `python -m ovms_plugin pull ... --name m` does
    after = host.invoke("chat", {"model": "m", "messages": QUESTION, "max_tokens": 12,
                                 "temperature": 0})
    assert after.code == 0 and "Paris" in json.loads(after.response_data)[
        "choices"][0]["message"]["content"]
    streaming.join(120)
    assert result["reader"].error is None  # finished on the old engine
    assert result["events"][-1]["choices"][0]["finish_reason"] == "length"
    assert models_of(host, "GetRunningModels")["m"]["digest"] == \
        models_of(host, "ListModels")["m"]["digest"]

    # Removed by another process: no longer served, no longer listed as running.
    store.delete("m")
    r = host.invoke("chat", {"model": "m", "messages": QUESTION, "max_tokens": 2})
    assert r.code == 3000
    assert "m" not in models_of(host, "GetRunningModels")


def test_a_pull_never_changes_a_loaded_models_type(host, plugin_home: Path):
    embed = devmodels.ensure_models(devmodels.default_cache_dir(),
                                    [devmodels.TINY_EMBED])[devmodels.TINY_EMBED]
    assert host.json_call("LoadModel", {"model": "tiny-chat"}).code == 0
    digest = models_of(host, "ListModels")["tiny-chat"]["digest"]
    r = host.call("PullModel", _pull_req("PullModel", {"model": str(embed),
                                                       "name": "tiny-chat"}), timeout=300)
    assert r.code == 3001 and "loaded as a text-generation model" in r.message
    assert models_of(host, "ListModels")["tiny-chat"]["digest"] == digest  # untouched
    ok = host.invoke("chat", {"model": "tiny-chat", "messages": QUESTION, "max_tokens": 2})
    assert ok.code == 0, ok.message
