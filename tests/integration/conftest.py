"""Fixtures of the black-box server tests: Python gRPC stubs generated at test
time from proto/ with grpc_tools.protoc, a tiny random BERT, a running
metatt-server and a client. Helpers live in server_harness.py."""
import pytest

from server_harness import ROOT, Client, Server, load_stubs, write_tiny_bert

MINILM = ROOT / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Namespace with jobs_pb2, jobs_pb2_grpc, datasets_pb2, ... modules."""
    return load_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer BERT (hidden 32, 2 heads) with a small WordPiece vocabulary."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


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


# The real base model behind the Python client (client/python), one server
# per test module: test_export_reader.py, test_peft_interop.py.
@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    """The data dir of the module's minilm_server."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def minilm_server(minilm_data):
    """metatt-server on models/all-MiniLM-L6-v2 (--batch_timeout_ms=1)."""
    if not (MINILM / "model.safetensors").exists():
        pytest.fail(f"{MINILM} missing: scripts/setup.sh lays it out")
    s = Server(minilm_data, MINILM, extra=["--batch_timeout_ms=1"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mc(minilm_server):
    """metatt_client.Client (the Python client package) of minilm_server."""
    import sys

    sys.path.insert(0, str(ROOT / "client" / "python"))
    from metatt_client import Client as PyClient

    c = PyClient(f"127.0.0.1:{minilm_server.port}", timeout=120)
    yield c
    c.close()
