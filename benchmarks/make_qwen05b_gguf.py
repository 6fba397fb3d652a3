"""Write a Qwen2.5-0.5B-shaped GGUF with random weights, quantized Q4_1.

Why: issue 16's side-by-side benchmark runs llama.cpp's ``llama-server`` and
openvino-genai on the very same GGUF file. The real test model (SmolLM2-135M)
is too small to say much about a 0.5B-class workload, and no bigger GGUF can be
downloaded here, so this script makes one. The benchmark is a throughput
workload (requests use ``ignore_eos``), so the weights only need to be of the
right shape and harmless: normal(0, 0.02), seeded, so the file is reproducible.

Model (architecture ``qwen2``, the shape of Qwen2.5-0.5B):
    hidden 896, 24 layers, 14 attention heads, 2 KV heads, head size 64,
    FFN 4864, rope theta 1e6, RMS eps 1e-6, context 32768, tied embeddings
    (no ``output.weight``), q/k/v biases.

Tokenizer: the ``tokenizer.*`` metadata (BPE vocabulary of 49152 tokens,
merges, token types, special ids, chat template) is copied from the project's
SmolLM2-135M-Instruct.Q4_1.gguf, and ``token_embd`` has that vocabulary size.

Tensor types mirror SmolLM2-135M-Instruct.Q4_1.gguf:
    token_embd.weight           Q8_0 (also the output projection: tied)
    every 2-D block matrix      Q4_1
    norms and q/k/v biases      F32
    general.file_type           3 (MOSTLY_Q4_1)

Requires the ``gguf`` package from PyPI, exactly version 0.19.0 (llama.cpp's own
pure-Python reader/writer; its numpy quantizers do Q4_0/Q4_1/Q8_0). Keep it out
of the project's venv; e.g.::

    python -m pip install --target /tmp/gguf-0.19.0 --no-deps gguf==0.19.0
    PYTHONPATH=/tmp/gguf-0.19.0 python benchmarks/make_qwen05b_gguf.py [OUT]

(``--no-deps`` is enough where numpy and PyYAML are installed, as in the project
venv.) The default OUT is
``${OVMS_PLUGIN_CACHE:-$HOME/.cache/ovms-plugin}/bench-models/qwen05b-shape-q4_1.gguf``.
The file is written to a temporary name beside OUT and renamed into place, then
its path and sha256 are printed. Writing takes about half a minute on 2 cores
and ~0.4 GB of memory; the file is 272,506,272 bytes.

Optional checks after writing: ``--check-openvino`` loads the file with
``openvino_genai.LLMPipeline`` (8 tokens, ignore_eos) and
``ContinuousBatchingPipeline``; ``--check-llama-server BIN`` starts that
``llama-server`` on 127.0.0.1 and asks ``/v1/completions`` for 8 tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

GGUF_VERSION = "0.19.0"

ARCH = "qwen2"
HIDDEN = 896
LAYERS = 24
HEADS = 14
KV_HEADS = 2
HEAD_SIZE = 64
FFN = 4864
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
CONTEXT = 32768
WEIGHT_STD = 0.02
DEFAULT_SEED = 20240616

SOURCE_TOKENIZER_GGUF = (
    "test-models/smollm2-gguf-v1/SmolLM2-135M-Instruct.Q4_1.gguf"  # under the cache dir
)


def cache_dir() -> Path:
    env = os.environ.get("OVMS_PLUGIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ovms-plugin"


def import_gguf() -> Any:
    """Import ``gguf`` and refuse any version but the pinned one."""
    try:
        version = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        import gguf
    except ImportError:
        sys.exit(
            f"error: the 'gguf' package is not importable; install gguf=={GGUF_VERSION} "
            f"e.g. `python -m pip install --target /tmp/gguf-{GGUF_VERSION} --no-deps "
            f"gguf=={GGUF_VERSION}` and run with PYTHONPATH=/tmp/gguf-{GGUF_VERSION}"
        )
    if version != GGUF_VERSION:
        sys.exit(
            f"error: gguf {version} found at {gguf.__file__}, but this script is written "
            f"against gguf=={GGUF_VERSION} (writer and quantizer API); install that version"
        )
    return gguf


def read_tokenizer(gguf: Any, path: Path) -> tuple[list[tuple[str, Any, Any, Any]], int]:
    """Return the ``tokenizer.*`` key/values of ``path`` (key, value, type, subtype)
    and its vocabulary size."""
    reader = gguf.GGUFReader(str(path))
    value_type = gguf.GGUFValueType
    items: list[tuple[str, Any, Any, Any]] = []
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == value_type.ARRAY else None
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        items.append((key, value, main, sub))
    if n_vocab == 0:
        sys.exit(f"error: {path} has no tokenizer.ggml.tokens")
    return items, n_vocab


def build(gguf: Any, out: Path, tokenizer_gguf: Path, seed: int) -> None:
    quants = gguf.quants
    qt = gguf.GGMLQuantizationType
    tok_items, n_vocab = read_tokenizer(gguf, tokenizer_gguf)
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)

    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_type("model")
    writer.add_name("qwen05b-shape random weights (benchmark only)")
    writer.add_size_label("0.5B")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, main, sub in tok_items:
        writer.add_key_value(key, value, main, sub)

    # numpy shapes are (rows, cols) = (out_features, in_features); GGUF records the
    # reverse order (ne0 = in_features), which the writer derives from the array.
    def add_quant(name: str, rows: int, cols: int, qtype: Any) -> None:
        data = quants.quantize(normal(rows, cols), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    def add_f32(name: str, data: np.ndarray) -> None:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

    q_out, kv_out = HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE
    add_quant("token_embd.weight", n_vocab, HIDDEN, qt.Q8_0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        add_f32(p + "attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        add_quant(p + "attn_q.weight", q_out, HIDDEN, qt.Q4_1)
        add_f32(p + "attn_q.bias", normal(q_out))
        add_quant(p + "attn_k.weight", kv_out, HIDDEN, qt.Q4_1)
        add_f32(p + "attn_k.bias", normal(kv_out))
        add_quant(p + "attn_v.weight", kv_out, HIDDEN, qt.Q4_1)
        add_f32(p + "attn_v.bias", normal(kv_out))
        add_quant(p + "attn_output.weight", HIDDEN, q_out, qt.Q4_1)
        add_f32(p + "ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        add_quant(p + "ffn_gate.weight", FFN, HIDDEN, qt.Q4_1)
        add_quant(p + "ffn_up.weight", FFN, HIDDEN, qt.Q4_1)
        add_quant(p + "ffn_down.weight", HIDDEN, FFN, qt.Q4_1)
    add_f32("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_openvino(path: Path) -> None:
    import openvino_genai as ov_genai

    t0 = time.monotonic()
    pipe = ov_genai.LLMPipeline(str(path), "CPU")
    print(f"openvino-genai: LLMPipeline loaded in {time.monotonic() - t0:.1f} s", flush=True)
    for n in (8, 32):
        config = ov_genai.GenerationConfig(max_new_tokens=n, ignore_eos=True)
        result = pipe.generate(["hello"], config)
        perf = result.perf_metrics
        print(
            f"openvino-genai: generated {perf.get_num_generated_tokens()} tokens, "
            f"ttft {perf.get_ttft().mean:.0f} ms, "
            f"{perf.get_throughput().mean:.1f} tokens/s: {result.texts[0]!r}",
            flush=True,
        )
        if perf.get_num_generated_tokens() != n:
            sys.exit(f"error: openvino-genai generated {perf.get_num_generated_tokens()} != {n}")
    del pipe
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = 1
    t0 = time.monotonic()
    cb = ov_genai.ContinuousBatchingPipeline(str(path), scheduler, "CPU")
    print(f"openvino-genai: ContinuousBatchingPipeline loaded in {time.monotonic() - t0:.1f} s")
    del cb


def check_llama_server(path: Path, binary: Path, port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    cmd = [
        str(binary),
        "-m",
        str(path),
        "-t",
        "2",
        "-np",
        "1",
        "-c",
        "1024",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
    os.close(fd)
    with open(log_name, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            answer = _ask_llama_server(proc, base, log_name)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    n = answer.get("usage", {}).get("completion_tokens")
    timings = answer.get("timings", {})
    print(
        f"llama-server: {n} completion tokens, "
        f"{timings.get('predicted_per_second', float('nan')):.1f} tokens/s: "
        f"{answer['choices'][0]['text']!r}"
    )
    if n != 8:
        sys.exit(f"error: llama-server answered {n} tokens, expected 8; log: {log_name}")


def _ask_llama_server(proc: subprocess.Popen[bytes], base: str, log_name: str) -> Any:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"error: llama-server exited with {proc.returncode}; log: {log_name}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"error: llama-server not healthy in 120 s; log: {log_name}")
        time.sleep(0.5)
    body = json.dumps({"prompt": "hello", "max_tokens": 8, "ignore_eos": True}).encode()
    req = urllib.request.Request(
        base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out",
        nargs="?",
        type=Path,
        default=cache_dir() / "bench-models" / "qwen05b-shape-q4_1.gguf",
        help="where to write the GGUF (default: %(default)s)",
    )
    parser.add_argument(
        "--tokenizer-gguf",
        type=Path,
        default=cache_dir() / SOURCE_TOKENIZER_GGUF,
        help="GGUF whose tokenizer.* metadata is copied (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--check-openvino",
        action="store_true",
        help="load the result with openvino-genai and generate 8 and 32 tokens",
    )
    parser.add_argument(
        "--check-llama-server",
        type=Path,
        metavar="BIN",
        help="serve the result with this llama-server and ask for 8 tokens",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=18777,
        help="127.0.0.1 port for --check-llama-server (default: %(default)s)",
    )
    args = parser.parse_args()

    if not args.tokenizer_gguf.is_file():
        sys.exit(f"error: tokenizer source {args.tokenizer_gguf} not found")
    gguf = import_gguf()
    out: Path = args.out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build(gguf, tmp, args.tokenizer_gguf, args.seed)
        tmp.chmod(0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(out)
    print(f"sha256 {sha256_of(out)}  size {out.stat().st_size}", flush=True)

    if args.check_openvino:
        check_openvino(out)
    if args.check_llama_server is not None:
        check_llama_server(out, args.check_llama_server, args.port)


if __name__ == "__main__":
    main()
