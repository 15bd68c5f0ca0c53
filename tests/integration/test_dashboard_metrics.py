"""Every metric the Grafana dashboard and the alert rules use exists in a live
/metrics scrape of a real metatt-server (after upload, training and
predictions, so labelled series and histograms have samples), and every label
matcher in them selects at least one scraped series. A renamed metric or label
therefore fails here instead of leaving a silently empty panel or an alert
that never fires. (Static parsing of the deploy files is in
tests/python/test_deploy.py.)"""
import json
import re
import urllib.request

import pytest
import yaml

from server_harness import ROOT, Client, Server, make_rows, tsv_bytes

# Series Prometheus makes itself for every scrape target, not exposed by us.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                        "scrape_series_added", "scrape_samples_post_metric_relabeling"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "inf", "nan", "atan2"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_exprs():
    out = []

    def walk(o, where):
        if isinstance(o, dict):
            if isinstance(o.get("expr"), str) and o["expr"].strip():
                out.append((where, o["expr"]))
            for v in o.values():
                walk(v, where)
        elif isinstance(o, list):
            for v in o:
                walk(v, where)

    files = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert files, "no dashboard in deploy/grafana/dashboards"
    for f in files:
        walk(json.loads(f.read_text()), f.name)
    return out


def alert_exprs():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [(f"alerts.yml:{r.get('alert') or r.get('record')}", r["expr"])
            for g in rules["groups"] for r in g["rules"]]


def selectors(expr):
    """[(metric name, {label: (op, value)})] of every vector selector in a
    PromQL expression. Handles functions, aggregations with by/without
    clauses, label matchers, range/subquery brackets and string literals."""
    # Grafana template variables are not PromQL.
    expr = re.sub(r"\$\{?\w+\}?", "1m", expr)
    out = []
    i, n = 0, len(expr)
    token = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
    while i < n:
        ch = expr[i]
        if ch in "\"'`":  # string literal (only inside matchers or functions)
            j = expr.index(ch, i + 1)
            i = j + 1
            continue
        if ch == "[":  # range / subquery
            i = expr.index("]", i) + 1
            continue
        if ch == "{":  # a selector without a name: {__name__="..."}
            j, labels = parse_matchers(expr, i)
            name = labels.pop("__name__", (None, None))[1]
            assert name, f"selector without a metric name in {expr!r}"
            out.append((name, labels))
            i = j
            continue
        m = token.match(expr, i)
        if m and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_.")):
            word = m.group(0)
            j = m.end()
            k = j
            while k < n and expr[k] == " ":
                k += 1
            if word.lower() in ("by", "without", "on", "ignoring", "group_left", "group_right"):
                if k < n and expr[k] == "(":  # label list, not metrics
                    j = expr.index(")", k) + 1
            elif k < n and expr[k] == "(":
                pass  # function or aggregation
            elif word in AGGREGATIONS:
                pass  # `sum by (le) (...)`: the by/without clause follows
            elif word.lower() in PROMQL_KEYWORDS:
                pass
            else:
                labels = {}
                if k < n and expr[k] == "{":
                    j, labels = parse_matchers(expr, k)
                out.append((word, labels))
            i = j
            continue
        i += 1
    return out


def parse_matchers(expr, i):
    j = expr.index("}", i)
    labels = {}
    for m in re.finditer(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?',
                         expr[i + 1:j]):
        labels[m.group(1)] = (m.group(2), m.group(3))
    return j + 1, labels


def parse_exposition(text):
    """-> (types {family: type}, samples [(sample name, {label: value})])."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split(None, 3)
            types[fam] = typ
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+\S+", line)
            assert m, f"unparsable /metrics line: {line!r}"
            labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            samples.append((m.group(1), labels))
    return types, samples


def matches(labels, matchers):
    for k, (op, v) in matchers.items():
        have = labels.get(k, "")
        if op == "=" and have != v:
            return False
        if op == "!=" and have == v:
            return False
        if op == "=~" and not re.fullmatch(v, have):
            return False
        if op == "!~" and re.fullmatch(v, have):
            return False
    return True


def test_selector_parser():
    sel = selectors('histogram_quantile(0.99, sum by (le) (rate(foo_bucket{a="x",b=~"y|z"}[5m])))'
                    ' / on(job) group_left(x) bar offset 5m > 0.5 and baz{c!="d"}')
    assert sel == [("foo_bucket", {"a": ("=", "x"), "b": ("=~", "y|z")}), ("bar", {}),
                   ("baz", {"c": ("!=", "d")})]
    assert selectors('up{job="metatt"} == 0') == [("up", {"job": ("=", "metatt")})]
    assert selectors('sum(rate(x_total[$__rate_interval]))') == [("x_total", {})]
    assert selectors('{__name__="q", l="v"}') == [("q", {"l": ("=", "v")})]


# Generation metrics: sampled on decoder servers only (tests/integration/
# test_generate.py reads them there); this test's server is an encoder.
DECODER_ONLY = ("metatt_generate", "metatt_generated_", "metatt_time_to_first_token")


SERVER_METRICS_SRC = (ROOT / "server" / "monitoring" / "server_metrics.cc").read_text()


def decoder_only(name):
    return name.startswith(DECODER_ONLY)


def name_declared(name, types):
    """`name` (or the histogram family it is a series of) has a # TYPE line on
    the scrape, or, for a labelled family with no series yet (prometheus-cpp
    then prints nothing for it), is a family the server's source registers."""
    # server_metrics.cc registers a family as family(BuildX(), "name", help)
    # (or with prometheus-cpp's builder, .Name("name")).
    registered = re.findall(
        r'family\(\s*Build[A-Za-z]+\(\),\s*"(metatt_[a-z0-9_]+)"|\.Name\("(metatt_[a-z0-9_]+)"\)',
        SERVER_METRICS_SRC)
    fams = set(types) | {a or b for a, b in registered}
    return name in fams or any(name == f + s for f in fams for s in HISTOGRAM_SUFFIXES)


def scrape(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                timeout=10) as r:
        return r.read().decode()


def test_dashboard_and_alert_metrics_exist_in_live_scrape(pb, tmp_path, tiny_model):
    j = pb.jobs_pb2
    inf = pb.inference_pb2
    exprs = dashboard_exprs() + alert_exprs()
    server = Server(tmp_path / "data", tiny_model).start()
    try:
        c = Client(pb, server.channel())
        ds = c.upload("dash", tsv_bytes(make_rows(40)))
        job = c.create_job("dashfam", "D", ds.id, steps=6)
        assert c.wait_state(job.id, {j.SUCCEEDED, j.FAILED}, timeout=300).state == j.SUCCEEDED
        for i in range(3):
            c.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family="dashfam", task="D", text=f"nice film {i}")]), timeout=60)
        import grpc
        try:  # a failing input, so series with code != "OK" exist too
            c.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family="no-such-family", task="D", text="x")]), timeout=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("Predict on an unknown family succeeded")
        # Sampled gauges (adapter parameters per family) appear within ~2 s.
        import time
        deadline = time.time() + 15
        while 'metatt_adapter_parameters{family="dashfam"}' not in scrape(server):
            assert time.time() < deadline, "metatt_adapter_parameters{family} never appeared"
            time.sleep(0.3)
        types, samples = parse_exposition(scrape(server))
    finally:
        server.stop()

    sample_names = {s for s, _ in samples}
    problems = []
    used = set()
    for where, expr in exprs:
        sels = selectors(expr)
        if not sels:
            problems.append(f"{where}: no metric in {expr!r}")
        for name, matchers in sels:
            used.add(name)
            if name in PROMETHEUS_SYNTHETIC:
                if matchers.get("job") != ("=", "metatt"):
                    problems.append(f"{where}: {name} without job=\"metatt\" in {expr!r}")
                continue
            if name not in sample_names and decoder_only(name) and name_declared(name, types):
                continue  # an encoder server declares the generation metrics but never samples them
            if name not in sample_names:
                base = next((name[:-len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
                hint = ""
                if base and types.get(base) not in ("histogram", "summary", None):
                    hint = f" ({base} is a {types[base]}, not a histogram)"
                elif name in types and types[name] == "histogram":
                    hint = " (a histogram: use _bucket/_sum/_count)"
                problems.append(f"{where}: {name} is not in /metrics{hint}")
                continue
            if not any(s == name and matches(lab, matchers) for s, lab in samples):
                have = sorted({tuple(sorted(l.items())) for s, l in samples if s == name})
                problems.append(f"{where}: no {name} series matches {matchers}; scraped: {have}")
    assert not problems, "\n".join(problems)
    # The dashboard covers what the server exports (a new metric gets a panel).
    ours = {f for f in types if f.startswith("metatt_")}
    covered = {n for n in used for f in ours if n == f or n in {f + s for s in HISTOGRAM_SUFFIXES}}
    missing = sorted(f for f in ours if not any(u == f or u.startswith(f + "_") for u in covered))
    assert not missing, f"server metrics on no dashboard panel or alert: {missing}"
