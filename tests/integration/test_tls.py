"""TLS and mutual TLS on the gRPC port, with certificates made by `openssl`
in the test; the plaintext default and its start-up warning; metattctl's TLS,
token and hash-token."""
import hashlib
import os
import subprocess
import sys

import grpc
import pytest

from server_harness import (ROOT, Client, Server, build_dir, token_entry, wait_log, with_token,
                            write_tokens)

TOKEN = "tls-test-token-0123456789"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj",
            f"/CN={name}", cwd=d)


def make_leaf(d, ca, name, ext):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
            cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(d, "ca", "server", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    make_leaf(d, "ca", "client", "extendedKeyUsage=clientAuth")
    make_leaf(d, "other-ca", "stranger", "extendedKeyUsage=clientAuth")
    write_tokens(d / "tokens.json", [token_entry("acme", TOKEN, "user")])
    return d


def tls_channel(port, pki, ca="ca", client=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / f"{ca}.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def list_datasets(pb, channel, token=TOKEN):
    c = Client(pb, with_token(channel, token) if token else channel)
    return c.datasets.ListDatasets(pb.datasets_pb2.ListDatasetsRequest(), timeout=10)


def refused(pb, channel):
    with pytest.raises(grpc.RpcError) as e:
        list_datasets(pb, channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()


def metattctl(*args, stdin=None, env=None):
    exe = build_dir() / "client" / "metattctl"
    if not exe.exists():
        pytest.skip(f"{exe} not built")
    return subprocess.run([str(exe), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_plaintext_default_is_logged(server):
    wait_log(server, "WARNING: plaintext and no authentication")


def test_tls_server(pb, pki, tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model, extra=[
        f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
        f"--auth_tokens={pki / 'tokens.json'}"]).start()
    try:
        wait_log(s, "): TLS, bearer tokens (1 from")
        assert not any("WARNING" in line for line in s.stderr_lines)
        assert list_datasets(pb, tls_channel(s.port, pki)).datasets == []
        refused(pb, grpc.insecure_channel(f"127.0.0.1:{s.port}"))  # no TLS
        refused(pb, tls_channel(s.port, pki, ca="other-ca"))     # server cert not trusted
        with pytest.raises(grpc.RpcError) as e:                    # TLS but no token
            list_datasets(pb, tls_channel(s.port, pki), token=None)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        server = f"--server=127.0.0.1:{s.port}"
        ok = metattctl(server, f"--tls_ca={pki / 'ca.pem'}", "--timeout=10", "datasets", "list",
                       env={"METATT_TOKEN": TOKEN})
        assert ok.returncode == 0, ok.stderr
        no_token = metattctl(server, f"--tls_ca={pki / 'ca.pem'}", "--timeout=10", "datasets",
                             "list", env={"METATT_TOKEN": ""})
        assert no_token.returncode != 0 and "UNAUTHENTICATED" in no_token.stderr
        plain = metattctl(server, f"--token={TOKEN}", "--timeout=5", "datasets", "list")
        assert plain.returncode != 0
    finally:
        s.stop()


def test_mutual_tls_server(pb, pki, tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model, extra=[
        f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
        f"--tls_client_ca={pki / 'ca.pem'}", f"--auth_tokens={pki / 'tokens.json'}"]).start()
    try:
        wait_log(s, "TLS with client certificates (mTLS)")
        assert list_datasets(pb, tls_channel(s.port, pki, client="client")).datasets == []
        refused(pb, tls_channel(s.port, pki))                       # no client certificate
        refused(pb, tls_channel(s.port, pki, client="stranger"))    # signed by another CA
        ok = metattctl(f"--server=127.0.0.1:{s.port}", f"--tls_ca={pki / 'ca.pem'}",
                       f"--tls_cert={pki / 'client.pem'}", f"--tls_key={pki / 'client.key'}",
                       f"--token={TOKEN}", "--timeout=10", "datasets", "list")
        assert ok.returncode == 0, ok.stderr
        # The Python client package: root certificate, client certificate, token.
        sys.path.insert(0, str(ROOT / "client" / "python"))
        from metatt_client import Client as PyClient, MetattError
        with PyClient(f"127.0.0.1:{s.port}", timeout=10, token=TOKEN,
                      root_certificates=str(pki / "ca.pem"), client_cert=str(pki / "client.pem"),
                      client_key=str(pki / "client.key")) as c:
            assert c.list_datasets() == []
        with PyClient(f"127.0.0.1:{s.port}", timeout=10, token="wrong-token-0123456789",
                      root_certificates=str(pki / "ca.pem"), client_cert=str(pki / "client.pem"),
                      client_key=str(pki / "client.key")) as c:
            with pytest.raises(MetattError) as e:
                c.list_datasets()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()


def test_bad_tls_flags_stop_the_server(pki, tmp_path, tiny_model):
    for extra, flag in (([f"--tls_cert={pki / 'server.pem'}"], "--tls_cert and --tls_key"),
                        ([f"--tls_cert={pki / 'nope.pem'}", f"--tls_key={pki / 'server.key'}"],
                         "--tls_cert: cannot read"),
                        ([f"--auth_tokens={pki / 'server.pem'}"], "--auth_tokens")):
        s = Server(tmp_path / "data", tiny_model, extra=extra)
        with pytest.raises(pytest.fail.Exception):
            s.start(timeout=60)
        wait_log(s, flag)


def test_hash_token_matches_sha256():
    r = metattctl("hash-token", stdin=TOKEN + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == hashlib.sha256(TOKEN.encode()).hexdigest()
    short = metattctl("hash-token", "short")
    assert short.returncode != 0 and "at least 16" in short.stderr
