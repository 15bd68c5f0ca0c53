"""The real metatt-http gateway (server/http/) on 127.0.0.1:0 in front of a
real metatt-server (server_harness.Server), for the HTTP/OpenAI tests."""
import subprocess
import time

import pytest

from server_harness import build_dir, drain_stderr, read_ready_ports, stop_process


def gateway_binary():
    p = build_dir() / "server" / "http" / "metatt-http"
    if not p.exists():
        pytest.fail(f"binary {p} not built: cmake --build <build> --target metatt-http")
    return p


class Gateway:
    """One metatt-http process; `url` is its /v1 base URL once started."""

    def __init__(self, server_port, extra=()):
        self.server_port = server_port
        self.extra = list(extra)
        self.proc = None
        self.port = None
        self.stderr_lines = []

    def command(self):
        return [str(gateway_binary()), "--listen=127.0.0.1:0",
                f"--server=127.0.0.1:{self.server_port}", *self.extra]

    def start(self, timeout=30):
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        drain_stderr(self.proc, self.stderr_lines)
        self.port = read_ready_ports(self.proc, timeout).get("LISTENING")
        if self.port is None:
            self.stop()
            time.sleep(0.2)
            pytest.fail("metatt-http did not start:\n" + "\n".join(self.stderr_lines[-30:]))
        return self

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self):
        return self.base + "/v1"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, 15)


def wait_job_events(client, job_id, timeout=300):
    """Polls an `openai` client's fine-tuning job events (newest first, as
    OpenAI lists them) until the newest says the job ended; returns the last
    page and its messages."""
    deadline = time.time() + timeout
    events, messages = None, []
    while time.time() < deadline:
        events = client.fine_tuning.jobs.list_events(job_id, limit=100)
        messages = [e.message for e in events.data]
        if messages and messages[0].startswith(("Job succeeded", "Job failed", "Job cancelled")):
            break
        time.sleep(0.5)
    return events, messages


def make_tiny_decoder(out, smol_dir, max_positions=4096):
    """A random 2-layer Llama (GQA, hidden 32) saved by transformers, carrying
    SmolLM2's tokenizer and chat template (as test_generation_jobs.py makes
    one); `max_positions` is its context."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol_dir / f).exists():
            shutil.copy(smol_dir / f, out / f)
    return out
