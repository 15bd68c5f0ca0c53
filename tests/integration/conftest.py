"""Fixtures of the black-box server tests: Python gRPC stubs generated at test
time from proto/ with grpc_tools.protoc, a tiny random BERT, a running
metatt-server and a client. Helpers live in server_harness.py."""
import importlib
import pathlib
import sys

import pytest

from server_harness import ROOT, WORDS, Client, Server


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Namespace with jobs_pb2, jobs_pb2_grpc, datasets_pb2, ... modules."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *protos])
    assert rc == 0, "grpc_tools.protoc failed"
    sys.path.insert(0, str(out))

    class Mods:
        pass

    m = Mods()
    for name in ("jobs", "datasets", "adapters", "inference"):
        setattr(m, f"{name}_pb2", importlib.import_module(f"metatt.v1.{name}_pb2"))
        setattr(m, f"{name}_pb2_grpc", importlib.import_module(f"metatt.v1.{name}_pb2_grpc"))
    return m


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer BERT (hidden 32, 2 heads) with a small WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(letters + ".,!?")
    vocab += ["##" + c for c in letters]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     type_vocab_size=2)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL on a free loopback port (pg_fixture.py); fails, never skips."""
    from pg_fixture import PostgresServer

    pg = PostgresServer().start()
    yield pg
    pg.stop()


@pytest.fixture
def server(tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model).start()
    yield s
    s.stop()


@pytest.fixture
def client(pb, server):
    return Client(pb, server.channel())
