"""`python -m ovms_plugin bench` end to end on the tiny model: levels, the vLLM metric
names, the probes, the baselines and ratios, multi-turn, JSON and the plot. (Figures are
recorded by benchmarks, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

METRICS = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
           "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
           "mean_e2el_ms", "p90_e2el_ms", "p99_e2el_ms", "completed", "failed"]


def test_bench_chat_with_baselines_multi_turn_json_and_plot(plugin_home: Path, tmp_path: Path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"models": {"tiny-chat": {"scheduler": {
        "cache_size": 1}}}}))
    r = subprocess.run(
        [sys.executable, "-m", "ovms_plugin", "--models-dir", str(plugin_home / "models"),
         "bench", "--model", "tiny-chat", "--concurrency", "1,2", "--requests", "4",
         "--prompt-tokens", "16", "--max-tokens", "8", "--ignore-eos", "--baselines",
         "--multi-turn", "--json", str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OVMS_PLUGIN_SETTINGS": str(settings)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "concurrency   2 [" in r.stderr  # progress
    assert "out tok/s" in r.stdout and "TTFT ms" in r.stdout  # the table
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert all(k in level for k in METRICS)
        assert level["completed"] == 4 and level["failed"] == 0
        assert level["warmup_requests"] == level["concurrency"]
        assert level["total_output_tokens"] == 4 * 8  # ignore_eos: exactly max_tokens each
        assert level["p99_health_check_ms"] is not None
    base = result["baselines"]
    # The ceiling works on batches as large as the busiest level's: 2 prompts per call.
    assert base["ceiling_cb_generate"]["output_throughput"] > 0
    assert base["ceiling_cb_generate"]["prompts_per_call"] == 2
    assert base["cb_generate_all_at_once"]["prompts_per_call"] == 4
    assert base["naive_llmpipeline"]["mean_tpot_ms"] > 0
    assert set(result["ratios"]) == {"throughput_c2_vs_ceiling", "throughput_c2_vs_naive",
                                     "throughput_c2_vs_all_at_once",
                                     "ttft_c1_vs_llmpipeline", "tpot_c1_vs_llmpipeline"}
    turns = result["multi_turn"]
    assert turns["prefix_caching_on"]["turn2_mean_prompt_tokens"] > 16
    assert "turn2_ttft_gain" in turns
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_embed_service(tmp_path: Path, test_models: dict[str, Path]):
    from ovms_plugin import devmodels
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    store = ModelStore(tmp_path / "models")
    embed = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-embed"])["tiny-embed"]
    pull.pull(store, pull.PullRequest(model=str(embed), name="e"), lambda m: None)
    out = tmp_path / "b.json"
    r = subprocess.run(
        [sys.executable, "-m", "ovms_plugin", "--models-dir", str(store.root), "bench",
         "--model", "e", "--concurrency", "4", "--requests", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [level] = json.loads(out.read_text())["levels"]
    assert level["completed"] == 16 and level["request_throughput"] > 0
