"""GGUF import of the built-in model, SmolLM2-135M-Instruct Q4_1 (98 MB): pull time,
conversion time and the conversion child's peak memory, from the local file and from the
loopback Hub look-alike the tests use (download + check + convert + validate + install).

    python benchmarks/gguf_pull.py [--rounds 3]

Writes benchmarks/gguf_pull.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_name("gguf_pull.json")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from hub_server import HubServer

    from ovms_plugin import builtin, devmodels
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description

    gguf = devmodels.ensure_models(devmodels.default_cache_dir(), [devmodels.SMOLLM2_GGUF])[
        devmodels.SMOLLM2_GGUF] / builtin.GGUF_NAME
    rows = []
    with HubServer() as hub, tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        os.link(gguf, repo / "SmolLM2-135M-Instruct-Q4_1.gguf")
        hub.add_repo("org/SmolLM2-135M-Instruct-GGUF", repo)
        os.environ["HF_ENDPOINT"] = hub.endpoint
        for i in range(args.rounds):  # interleaved: local, then Hub, each round
            for source, spec in (("local file", str(gguf)),
                                 ("loopback Hub", "org/SmolLM2-135M-Instruct-GGUF:Q4_1")):
                store = ModelStore(Path(tmp) / f"store-{i}-{len(rows)}")
                steps: dict[str, float] = {}
                started = time.perf_counter()

                def progress(msg: dict, steps: dict = steps, started: float = started) -> None:
                    steps.setdefault(msg.get("status", "").split(" ")[0],
                                     time.perf_counter() - started)

                entry = pull.pull(store, pull.PullRequest(model=spec, name="smollm2"),
                                  progress)
                total = time.perf_counter() - started
                conv = entry.manifest["conversion"]
                rows.append({"source": source, "round": i + 1, "pull_seconds": round(total, 2),
                             "convert_seconds": conv["seconds"],
                             "convert_peak_rss_mb": round(conv["peak_rss_bytes"] / 2**20),
                             "validate_seconds": round(total - steps.get("validating", 0), 2)
                             if "validating" in steps else None,
                             "installed_mb": round(entry.size / 2**20, 1)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for source in ("local file", "loopback Hub"):
        mine = [r for r in rows if r["source"] == source]
        summary[source] = {k: statistics.median(r[k] for r in mine)
                           for k in ("pull_seconds", "convert_seconds", "convert_peak_rss_mb")}
    OUT.write_text(json.dumps({"machine": machine_description(),
                               "command": f"python benchmarks/gguf_pull.py --rounds "
                                          f"{args.rounds}",
                               "medians": summary, "pulls": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
