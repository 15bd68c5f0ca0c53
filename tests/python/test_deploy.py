"""Static checks of the deployment files: no Docker engine or cluster runs
here, so check what can rot silently: every file the Dockerfile copies exists,
stages and args are consistent, manifests and the dashboard parse and agree on
ports and metric names."""
import json
import pathlib
import re
import shutil
import subprocess

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def dockerfile_instructions():
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_copies_only_existing_files():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip()}
    copies = [i for i in dockerfile_instructions() if i.startswith("COPY") and "--from=" not in i]
    assert copies, "no COPY instruction found"
    for ins in copies:
        parts = ins.split()[1:]
        for src in parts[:-1]:
            path = ROOT / src
            assert path.exists(), f"Dockerfile copies {src}, which does not exist"
            assert src.rstrip("/").split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"


def test_dockerfile_stages_and_user():
    ins = dockerfile_instructions()
    stages = {m.group(1) for i in ins if (m := re.match(r"FROM \S+ AS (\S+)", i))}
    for i in ins:
        if i.startswith("COPY --from="):
            assert i.split()[1].split("=")[1] in stages
    assert "runtime-cpu" in stages and "runtime-cuda" in stages
    # ARGs used in FROM must be declared before the first FROM.
    first_from = next(n for n, i in enumerate(ins) if i.startswith("FROM"))
    global_args = {i.split()[1].split("=")[0] for i in ins[:first_from] if i.startswith("ARG")}
    for i in ins:
        if i.startswith("FROM"):
            for var in re.findall(r"\$\{(\w+)\}", i):
                assert var in global_args, f"{var} used in FROM without a global ARG"
    assert any(i.startswith("USER metatt") for i in ins), "image must not run as root"
    assert any(i.startswith("HEALTHCHECK") for i in ins)
    assert any(i.startswith("VOLUME") and "/data" in i for i in ins)


def test_k8s_manifests_are_consistent():
    docs = {}
    for f in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        for d in yaml.safe_load_all(f.read_text()):
            docs[(d["kind"], d["metadata"]["name"] if "metadata" in d else f.name)] = d
    dep = docs[("Deployment", "metatt")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The kubelet's grpc probe has no TLS: metattctl health over TLS on the gRPC port.
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[0] == "metattctl" and cmd[-1] == "health", cmd
        assert f"--server=localhost:{ports['grpc']}" in cmd, cmd
        assert any(a.startswith("--tls_ca=/etc/metatt/secrets/") for a in cmd), cmd
    assert "nvidia.com/gpu" in c["resources"]["limits"]
    # Several replicas on one PostgreSQL, no shared volume: /data is each
    # pod's emptyDir cache; versions, datasets and checkpoints are in the
    # database (--blob_store=postgres), which has its own volume.
    assert dep["spec"]["replicas"] >= 2
    pod_volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    data = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/data")
    assert "emptyDir" in pod_volumes[data], pod_volumes[data]
    assert not any("persistentVolumeClaim" in v for v in pod_volumes.values())
    flags = docs[("ConfigMap", "metatt-flags")]["data"]["flags"]
    store = re.search(r"--store=(postgresql://\S+)", flags)
    assert store and "--blob_store=postgres" in flags, flags
    db_host = re.match(r"postgresql://[^@]+@([^:/]+)", store.group(1)).group(1)
    pg = docs[("StatefulSet", db_host)]
    assert ("Service", db_host) in docs
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pg_env = {e["name"]: e for e in pg["spec"]["template"]["spec"]["containers"][0]["env"]}
    env = {e["name"]: e for e in c["env"]}
    assert "$(POD_NAME)" in " ".join(c["args"]) and "POD_NAME" in env
    # One password: the database's and every replica's (libpq's PGPASSWORD).
    pw = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == pw
    kust = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(
        f.name for f in (ROOT / "deploy" / "k8s").glob("*.yaml") if f.name != "kustomization.yaml")
    pw_files = {g["name"]: g["files"] for g in kust["secretGenerator"]}[pw["name"]]
    assert any(f.split("=")[0] == pw["key"] for f in pw_files), pw_files
    assert f"--metrics_listen=0.0.0.0:{ports['metrics']}" in flags
    # Secure by default (README "Security"): TLS, tokens and a /metrics password,
    # all from the Secret the kustomization generates and the pod mounts.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["secrets"]["secret"]["secretName"]
    kust = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    generated = {g["name"]: g["files"] for g in kust["secretGenerator"]}
    files = {pathlib.PurePath(f).name for f in generated[secret]}
    for flag in ("tls_cert", "tls_key", "auth_tokens", "metrics_password_file"):
        m = re.search(rf"--{flag}=(\S+)", flags)
        assert m, f"--{flag} missing from the flags"
        path = pathlib.PurePath(m.group(1))
        assert str(path.parent) == mounts["secrets"] and path.name in files, (flag, path)
    assert "insecure_allow_open_network" not in flags
    svc = docs[("Service", "metatt")]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)


def dashboard_exprs():
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "metatt.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_exprs():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_dashboard_and_alerts_parse_and_use_our_metrics():
    exprs = dashboard_exprs() + alert_exprs()
    names = {n for e in exprs for n in re.findall(r"\b(metatt_[a-z_]+)", e)}
    assert len(names) >= 10, names


def test_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        # setup.sh installs Debian's prometheus package, which ships promtool.
        raise AssertionError("promtool not installed: run scripts/setup.sh")
    r = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
