"""settings.yaml: typed, validated (unknown keys and wrong types refused with the key's
path), read once and again only when the file changes, the last good settings kept when an
edit breaks it, environment overrides on top, and each kind's options typed by the kind.
Fast: no models, no OpenVINO."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from pathlib import Path

import pytest
import yaml

from ovms_plugin import settings
from ovms_plugin.kinds.embed import EmbedOptions
from ovms_plugin.kinds.image import ImageOptions
from ovms_plugin.kinds.llm import LLMOptions
from ovms_plugin.kinds.rerank import RerankOptions
from ovms_plugin.kinds.speech import SpeechOptions
from ovms_plugin.kinds.tts import TtsOptions

ENV = ("OVMS_PLUGIN_DEVICE", "OVMS_PLUGIN_MAX_WAITING", "OVMS_PLUGIN_COMPILE_CACHE",
       "OVMS_PLUGIN_MEMORY_BUDGET", "OVMS_PLUGIN_IDLE_UNLOAD", "OVMS_PLUGIN_DRAIN_SECONDS",
       "OVMS_PLUGIN_BODY_TIMEOUT", "OVMS_PLUGIN_ENGINE_STALL_SECONDS",
       "OVMS_PLUGIN_MAX_REQUEST_SIZE")


@pytest.fixture
def file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A settings file of this test's own; the file is looked at on every call."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "settings.yaml"
    monkeypatch.setenv("OVMS_PLUGIN_SETTINGS", str(path))
    monkeypatch.setattr(settings, "CHECK_INTERVAL", 0.0)
    return path


def write(path: Path, data: dict) -> None:
    """Writes the file so that its stamp changes even within the clock's resolution."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(yaml.safe_dump(data))
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1000))


def refused(data: dict, *words: str) -> str:
    with pytest.raises(settings.SettingsError) as e:
        settings.parse(data)
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    return str(e.value)


# --- validation -----------------------------------------------------------------------

def test_unknown_keys_are_refused_at_every_level_with_their_path():
    message = refused({"devic": "CPU"}, "unknown setting devic", "did you mean device?",
                      "memory_budget", "models")
    assert "at the top level" in message
    refused({"models": {"m": {"engin": "stateful"}}}, "models.m.engin",
            "did you mean engine?", "max_waiting_requests")
    refused({"models": {"smollm2": {"embed": {"poolin": "cls"}}}},
            "models.smollm2.embed.poolin", "did you mean pooling?", "max_batch_size")
    refused({"models": {"m": {"embedd": {}}}}, "models.m.embedd", "did you mean embed?")
    refused({"llm": {"max_promt_len": 9}}, "llm.max_promt_len", "max_prompt_len")
    refused({"image": {"size": 9}}, "image.size", "static_size")
    refused({"scheduler": {"cache_sise": 1}}, "scheduler.cache_sise", "cache_size")
    refused({"models": {"m": {"scheduler": {"max_seqs": 1}}}}, "models.m.scheduler.max_seqs",
            "max_num_seqs")


def test_wrong_types_are_refused_naming_the_key():
    refused({"embed": {"max_batch_size": "eight"}}, "embed.max_batch_size",
            "must be an integer", "'eight'")
    refused({"embed": {"max_batch_size": True}}, "embed.max_batch_size", "integer")
    refused({"models": {"m": {"llm": {"npu_max_prompt_len": 1.5}}}},
            "models.m.llm.npu_max_prompt_len", "integer")
    refused({"rerank": {"truncate": "no way"}}, "rerank.truncate", "true or false")
    refused({"embed": {"pooling": "avg"}}, "embed.pooling", "cls, mean, last_token")
    refused({"embed": {"max_wait_ms": -1}}, "embed.max_wait_ms", "0 or more")
    refused({"image": {"static_size": "512"}}, "image.static_size", "WIDTHxHEIGHT")
    refused({"image": {"min_size": 900, "max_size": 512}}, "image.min_size")
    refused({"models": {"m": {"device": 3}}}, "models.m.device must be a string")
    refused({"models": {"m": {"engine": "fast"}}}, "models.m.engine", "auto, stateful")
    refused({"models": {"m": 3}}, "models.m must be a mapping")
    refused({"models": {"m": {"properties": [1]}}}, "models.m.properties", "mapping")
    refused({"compile_cache": "sometimes"}, "compile_cache", "auto, always, never")
    refused({"memory_budget": "8XB"}, "memory_budget", "not a size")
    refused({"engine_stall_seconds": "soon"}, "engine_stall_seconds", "a number")
    refused({"shutdown_drain_seconds": -1}, "shutdown_drain_seconds", "0 or more")
    refused({"cors_origins": 3}, "cors_origins", "a list of strings or a string")


def test_values_are_coerced_and_empty_keys_mean_the_default():
    s = settings.parse({"device": "gpu", "memory_budget": "8GB", "compile_cache": "Never",
                        "embed": {"max_batch_size": "16", "max_wait_ms": 1,
                                  "static_shapes": None},
                        "models": {"m": {"device": "npu", "engine": "Stateful",
                                         "scheduler": {"cache_size": 2},
                                         "image": {"static_size": "64x64"}}}})
    assert s.device == "GPU" and s.memory_budget == 8 * 2**30 and s.compile_cache == "never"
    # Only the keys set: the engines' defaults and the model's own config fill the rest.
    assert s.options["embed"] == {"max_batch_size": 16, "max_wait_ms": 1.0}
    m = s.model("m")
    assert (m.device, m.engine, m.scheduler) == ("NPU", "stateful", {"cache_size": 2})
    assert m.options["image"] == {"static_size": "64x64"}
    assert s.model("other") == settings.ModelSection()


# --- per-kind options ---------------------------------------------------------------------

def test_each_kind_declares_its_options_with_defaults_and_docs():
    from ovms_plugin import kinds
    declared = {k.options_section: k.options_type for k in kinds.all() if k.options_section}
    assert declared == {"llm": LLMOptions, "embed": EmbedOptions, "rerank": RerankOptions,
                        "image": ImageOptions, "speech": SpeechOptions, "tts": TtsOptions}
    assert kinds.get("llm_stateful").options_type is LLMOptions
    for cls in declared.values():
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"], (cls, f.name)
    embed = settings.kind_options("embed")
    assert (embed.pooling, embed.normalize, embed.max_batch_size, embed.max_wait_ms,
            embed.truncate, embed.static_shapes) == (None, None, 8, 2.0, False, None)
    assert settings.kind_options("rerank").truncate is True
    llm = settings.kind_options("llm", {"npu_max_prompt_len": 4096})
    assert (llm.npu_max_prompt_len, llm.npu_min_response_len, llm.max_prompt_len) == \
        (4096, 128, None)
    image = settings.kind_options("image")
    assert (image.static_n, image.static_guidance_scale, image.static_size) == (1, 7.5, None)


def test_model_settings_merge_globals_and_the_models_section(file: Path):
    write(file, {"device": "CPU", "properties": {"A": 1}, "scheduler": {"max_num_seqs": 8},
                 "embed": {"max_batch_size": 4, "truncate": True},
                 "models": {"m": {"properties": {"B": 2}, "scheduler": {"cache_size": 1},
                                  "embed": {"max_batch_size": 16}}}})
    ms = settings.model_settings("m")
    assert ms.device == "CPU" and ms.properties == {"A": 1, "B": 2}
    assert ms.scheduler == {"max_num_seqs": 8, "cache_size": 1}
    assert ms.options["embed"] == {"max_batch_size": 16, "truncate": True}
    assert ms.options["llm"] == {} and ms.engine == "auto" and ms.max_waiting_requests == 64


# --- environment overrides ------------------------------------------------------------------

def test_environment_overrides(file: Path, monkeypatch: pytest.MonkeyPatch):
    write(file, {"device": "CPU", "max_waiting_requests": 3, "compile_cache": "never",
                 "memory_budget": "1GB", "shutdown_drain_seconds": 3,
                 "models": {"m": {"device": "GPU"}}})
    assert settings.model_settings("x").device == "CPU"
    assert settings.model_settings("x").max_waiting_requests == 3
    assert settings.compile_cache()[0] == "never"
    assert settings.memory_budget_bytes() == 2**30
    assert settings.shutdown_drain_seconds(plugin=False) == 3
    assert settings.shutdown_drain_seconds(plugin=True) == settings.PLUGIN_DRAIN_MAX
    monkeypatch.setenv("OVMS_PLUGIN_DEVICE", "npu")
    monkeypatch.setenv("OVMS_PLUGIN_MAX_WAITING", "5")
    monkeypatch.setenv("OVMS_PLUGIN_COMPILE_CACHE", "always")
    monkeypatch.setenv("OVMS_PLUGIN_MEMORY_BUDGET", "2GB")
    monkeypatch.setenv("OVMS_PLUGIN_DRAIN_SECONDS", "0.5")
    monkeypatch.setenv("OVMS_PLUGIN_BODY_TIMEOUT", "7")
    monkeypatch.setenv("OVMS_PLUGIN_ENGINE_STALL_SECONDS", "9")
    assert settings.model_settings("x").device == "NPU"
    assert settings.model_settings("m").device == "GPU"  # the model's own section wins
    assert settings.model_settings("x").max_waiting_requests == 5
    assert settings.compile_cache()[0] == "always"
    assert settings.memory_budget_bytes() == 2 * 2**30
    assert settings.shutdown_drain_seconds(plugin=False) == 0.5
    assert settings.body_timeout_seconds() == 7
    assert settings.engine_stall_seconds("image", "m") == 9
    monkeypatch.setenv("OVMS_PLUGIN_BODY_TIMEOUT", "-1")
    with pytest.raises(settings.SettingsError, match="OVMS_PLUGIN_BODY_TIMEOUT"):
        settings.body_timeout_seconds()


def test_defaults_without_a_file(file: Path):
    assert not file.exists()
    assert settings.compile_cache() == ("auto", 4 * 2**30)
    assert settings.max_request_bytes() == 64 * 2**20
    assert settings.idle_unload_seconds() == 0
    assert settings.engine_stall_seconds("llm") == settings.DEFAULT_ENGINE_STALL_SECONDS
    assert settings.engine_stall_seconds("image") == settings.DEFAULT_IMAGE_STALL_SECONDS
    assert settings.shutdown_drain_seconds(plugin=True) == settings.PLUGIN_DRAIN_SECONDS
    assert settings.body_timeout_seconds() == settings.DEFAULT_BODY_TIMEOUT
    assert settings.model_settings("m") == settings.ModelSettings(
        options={"llm": {}, "embed": {}, "rerank": {}, "image": {}, "speech": {},
                 "tts": {}})


# --- read once, again on a change -------------------------------------------------------------

@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every time the settings file is read and parsed."""
    seen: list[Path] = []
    real = settings.load_file

    def counting(path: Path | None = None) -> dict:
        seen.append(path)  # type: ignore[arg-type]
        return real(path)
    monkeypatch.setattr(settings, "load_file", counting)
    return seen


def test_the_file_is_read_once_and_again_after_it_changes(file: Path, reads: list[Path]):
    write(file, {"idle_unload_seconds": 5, "models": {"m": {"device": "CPU"}}})
    for _ in range(20):
        assert settings.idle_unload_seconds() == 5
        assert settings.model_settings("m").device == "CPU"
        settings.compile_cache()
    assert reads == [file]
    write(file, {"idle_unload_seconds": 7})
    assert settings.idle_unload_seconds() == 7
    assert settings.model_settings("m").device == "AUTO"
    assert reads == [file, file]


def test_the_file_is_looked_at_once_per_interval(file: Path, reads: list[Path],
                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(settings, "CHECK_INTERVAL", 3600.0)
    write(file, {"idle_unload_seconds": 5})
    assert settings.idle_unload_seconds() == 5
    write(file, {"idle_unload_seconds": 7})
    assert settings.idle_unload_seconds() == 5  # not looked at again yet
    assert settings.reload() is not None  # SIGHUP's way: at once
    assert settings.idle_unload_seconds() == 7
    assert reads == [file, file]


def test_a_broken_edit_keeps_the_last_good_settings(file: Path, reads: list[Path],
                                                    caplog: pytest.LogCaptureFixture):
    write(file, {"idle_unload_seconds": 5, "embed": {"max_batch_size": 4}})
    assert settings.idle_unload_seconds() == 5
    write(file, {"idle_unload_seconds": 6, "embed": {"max_bach_size": 4}})
    with caplog.at_level(logging.ERROR, logger=settings.__name__):
        for _ in range(5):
            assert settings.idle_unload_seconds() == 5
            assert settings.model_settings("m").options["embed"] == {"max_batch_size": 4}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "embed.max_bach_size" in errors[0].getMessage()
    assert "last good settings" in errors[0].getMessage()
    assert len(reads) == 2  # the broken file is not parsed again until it changes
    file.write_text("idle_unload_seconds: [unclosed\n")  # not even YAML
    assert settings.idle_unload_seconds() == 5
    write(file, {"idle_unload_seconds": 8})  # fixed
    assert settings.idle_unload_seconds() == 8


def test_a_broken_file_at_start_is_refused(file: Path, reads: list[Path]):
    file.write_text("models: {m: {device: CPU, colour: red}}\n")
    for _ in range(3):
        with pytest.raises(settings.SettingsError, match=r"models\.m\.colour"):
            settings.model_settings("m")
        with pytest.raises(settings.SettingsError, match=r"models\.m\.colour"):
            settings.compile_cache()
    assert len(reads) == 1
    file.write_text("- a list\n")
    assert settings.reload() is None  # logged; still refused
    with pytest.raises(settings.SettingsError, match="mapping at the top level"):
        settings.idle_unload_seconds()
    file.write_text("{{{\n")
    settings.reload()
    with pytest.raises(settings.SettingsError, match="not valid YAML"):
        settings.idle_unload_seconds()
    write(file, {"models": {"m": {"device": "CPU"}}})
    assert settings.model_settings("m").device == "CPU"


def test_reload_is_wired_to_sighup_where_there_is_one():
    class Loop:
        def __init__(self) -> None:
            self.handlers: dict = {}

        def add_signal_handler(self, sig, handler):
            self.handlers[sig] = handler

    loop = Loop()
    wired = settings.reload_on_sighup(loop)
    assert wired == hasattr(signal, "SIGHUP")
    if wired:
        assert loop.handlers[signal.SIGHUP] is settings.reload

    class Refusing:
        def add_signal_handler(self, sig, handler):
            raise NotImplementedError

    assert settings.reload_on_sighup(Refusing()) is False
