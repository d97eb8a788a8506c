#!/usr/bin/env python3
"""Checks docker/ without a Docker engine (run by tests/deploy/run.sh).

1. The images: both Dockerfiles build with `scripts/build.sh --install` (the
   script CI builds with: scripts/test.sh calls it) and copy that layout whole;
   they run as user 10001 with the health check `tandem health` and the entry
   point the layout holds.
2. The layout the script assembled (--root) starts the way the CPU image
   would: its entry point, the image's ENV (absolute paths mapped under the
   root), as uid 10001 when we are root; `tandem health` fails before the
   server is up and passes once it serves; it serves a completion, and exits 0
   on SIGTERM.
3. Files parse and validate: compose, Prometheus config and alert rules
   (promtool), Grafana provisioning and dashboard (the committed JSON is
   make_dashboard.py's output; every panel query parses, through promtool),
   Kubernetes manifests (kubernetes-validate for the built-in kinds; the
   custom resources' required fields by hand; the PrometheusRule carries the
   same groups as alerts.yml).
4. Every metric the dashboard, the alerts and the HPA name is one the running
   server's /metrics serves, after traffic that exercises them (base, an
   adapter, a route with a shadow).

usage: check.py --root ROOT --adapter PEFT_DIR [--write]
  --write regenerates docker/k8s/prometheusrule.yaml from alerts.yml.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
FAILURES = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def dockerfile(path):
    """(instructions as (KEYWORD, args) with continuations joined, ENV dict)."""
    text = path.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            kw, _, rest = line.partition(" ")
            instructions.append((kw.upper(), rest.strip()))
    env = {}
    for kw, rest in instructions:
        if kw == "ENV":
            env.update(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', rest)))
    return instructions, {k: v.strip('"') for k, v in env.items()}


def check_images():
    test_sh = (REPO / "scripts/test.sh").read_text()
    check(re.search(r"^scripts/build\.sh\s*$", test_sh, re.M) is not None, "CI builds with scripts/build.sh")
    envs = {}
    for name in ["Dockerfile", "Dockerfile.cpu"]:
        ins, env = dockerfile(DOCKER / name)
        envs[name] = env
        has = lambda kw, pat: any(k == kw and re.search(pat, a) for k, a in ins)  # noqa: E731
        check(has("RUN", r"^scripts/build\.sh --install /out$"), f"{name}: built by scripts/build.sh --install")
        check(has("COPY", r"^--from=build /out/ /$"), f"{name}: copies the script's layout whole")
        check(has("USER", r"^10001:10001$"), f"{name}: runs as 10001")
        check(has("HEALTHCHECK", r'CMD \["tandem", "health"\]$'), f"{name}: health check is `tandem health`")
        check(has("ENTRYPOINT", r'^\["docker-entrypoint\.sh"\]$'), f"{name}: entry point from the layout")
        check(has("VOLUME", r'"/models", "/adapters", "/data"'), f"{name}: volumes /models /adapters /data")
        check(has("STOPSIGNAL", r"^SIGTERM$"), f"{name}: stops with SIGTERM (drains)")
        check(env.get("TANDEM_SERVER_HOST") == "0.0.0.0", f"{name}: listens on every address")
    check(envs["Dockerfile"].get("TANDEM_DEVICE") == "cuda:0", "Dockerfile (CUDA): TANDEM_DEVICE=cuda:0")
    return envs["Dockerfile.cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(root, image_env, adapter):
    """Starts the layout as the CPU image would; returns (base url, process, env, served metric names)."""
    root = root.resolve()
    for rel in ["usr/local/bin/tandem", "usr/local/bin/docker-entrypoint.sh",
                "usr/local/share/tandem/default.toml", "usr/local/share/tandem/get-default-model.sh"]:
        check((root / rel).is_file(), f"layout has /{rel}")
    for d in ["models", "adapters", "data", "etc/tandem"]:
        check((root / d).is_dir(), f"layout has /{d}")
    model = REPO / "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    image_model = image_env["TANDEM_MODEL"]
    (root / image_model.lstrip("/")).symlink_to(model)
    shutil.copytree(adapter, root / "adapters/a")
    # As an operator's mounted adapters would be: readable by the image's user.
    for p in [root / "adapters/a", *(root / "adapters/a").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    for k, v in image_env.items():
        env[k] = str(root / v.lstrip("/")) if v.startswith("/") else v
    port = free_port()
    env["TANDEM_SERVER_PORT"] = str(port)
    env["TANDEM_CONFIG"] = str(root / "etc/tandem/config.toml")  # absent: defaults and env
    env["PATH"] = f"{root}/usr/local/bin:{env['PATH']}"
    env["TANDEM_CPU_THREADS"] = "2"
    health = lambda: subprocess.run(["tandem", "health"], env=env, capture_output=True)  # noqa: E731
    check(health().returncode == 1, "`tandem health` fails while nothing listens")
    cmd = ["docker-entrypoint.sh"]
    if os.getuid() == 0:
        os.chown(root / "data", 10001, 10001)
        cmd = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", "--"] + cmd
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and health().returncode != 0:
        time.sleep(0.5)
    up = check(proc.poll() is None and health().returncode == 0, "the layout starts and passes `tandem health`")
    if not up:
        print((root / "server.log").read_text()[-4000:])
        return None
    if os.getuid() == 0:
        owner = pathlib.Path(f"/proc/{proc.pid}").stat().st_uid
        check(owner == 10001, f"the server runs as uid 10001 (got {owner})")
    cfg = subprocess.run(["tandem", "config"], env=env, capture_output=True, text=True).stdout
    check(f"port = {port}" in cfg and 'host = "0.0.0.0"' in cfg, "`tandem config` shows the image's environment")
    return f"http://127.0.0.1:{port}", proc, env


def traffic(base, root):
    """Requests that make every family the dashboard reads appear."""
    c = httpx.Client(base_url=base, timeout=120)
    models = c.get("/v1/models").json()["data"]
    served = models[0]["id"]
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root.resolve() / "adapters/a")})
    check(r.status_code == 200, f"an adapter under /adapters loads ({r.status_code} {r.text[:200]})")
    spec = {"targets": [{"model": served, "weight": 1}, {"model": "a", "weight": 1}],
            "shadow": {"model": "a", "fraction": 1.0, "compare_tokens": 4}}
    r = c.put("/admin/routes/canary", json=spec)
    check(r.status_code == 200, f"a route with a shadow is accepted ({r.status_code} {r.text[:200]})")
    for model in [served, "a", "canary", "canary", "canary"]:
        r = c.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):", "max_tokens": 4,
                                             "temperature": 0, "user": f"u{time.time()}"})
        check(r.status_code == 200, f"a completion for {model} ({r.status_code})")
    c.post("/v1/completions", json={"prompt": 5})  # a 400 for the status panel
    time.sleep(1.0)  # the shadow copies finish after their primaries
    return c.get("/metrics").text


def served_names(text):
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


METRIC = re.compile(r"\b(?:vllm:[a-z_:]+|tandem_[a-z_]+)\b")


def check_metric_names(where, exprs, served):
    for expr in exprs:
        for name in METRIC.findall(expr):
            check(name in served, f"{where}: {name} is served by /metrics")


def promtool(args, what):
    r = subprocess.run(["promtool", *args], capture_output=True, text=True)
    check(r.returncode == 0, f"promtool {what}" + ("" if r.returncode == 0 else f": {r.stdout}{r.stderr}"))


def check_files(served, write):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    check(set(compose["services"]) == {"tandem", "prometheus", "grafana"}, "compose: tandem, prometheus, grafana")
    for svc in compose["services"].values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                check((DOCKER / src).exists(), f"compose mounts {src}, which exists")
    build = compose["services"]["tandem"]["build"]
    check((DOCKER / build["context"] / "docker/Dockerfile.cpu").exists(), "compose builds a Dockerfile that exists")
    check("healthcheck" not in compose["services"]["tandem"], "compose keeps the image's health check")

    prom = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    check(prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["tandem:8000"], "Prometheus scrapes tandem")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(prom, rule_files=[str(DOCKER / "prometheus/alerts.yml")])
        (pathlib.Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        promtool(["check", "config", str(pathlib.Path(tmp) / "prometheus.yml")], "check config (with alerts.yml)")
    alerts = yaml.safe_load((DOCKER / "prometheus/alerts.yml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    check_metric_names("alerts.yml", [r["expr"] for r in rules], served | {"up"})

    for p in sorted((DOCKER / "grafana/provisioning").rglob("*.yaml")):
        check(isinstance(yaml.safe_load(p.read_text()), dict), f"{p.relative_to(REPO)} parses")
    board_path = DOCKER / "grafana/dashboards/tandem.json"
    board = json.loads(board_path.read_text())
    sys.path.insert(0, str(DOCKER / "grafana"))
    import make_dashboard  # noqa: E402

    check(board == make_dashboard.dashboard(), "the dashboard is make_dashboard.py's output (rerun it)")
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    check(len(exprs) >= 20, f"the dashboard has its panels ({len(exprs)} queries)")
    check(all(p.get("datasource", {}).get("uid") == "prometheus" for p in board["panels"] if p["type"] != "row"),
          "every panel uses the provisioned data source")
    with tempfile.TemporaryDirectory() as tmp:
        # Grafana's interval variables are not PromQL: the queries are checked
        # as recording rules with them set to a duration.
        group = {"name": "dashboard", "rules": [
            {"record": f"dashboard:panel_{i}", "expr": e.replace("$__rate_interval", "5m")}
            for i, e in enumerate(exprs)]}
        (pathlib.Path(tmp) / "d.yml").write_text(yaml.safe_dump({"groups": [group]}))
        promtool(["check", "rules", str(pathlib.Path(tmp) / "d.yml")], "parses every dashboard query")
    check_metric_names("dashboard", exprs, served)

    k8s = {}
    for p in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if doc and "kind" in doc:
                k8s.setdefault(doc["kind"], []).append((p.name, doc))
    rule_doc = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "tandem", "labels": {"app.kubernetes.io/name": "tandem"}},
        "spec": {"groups": alerts["groups"]},
    }
    rule_path = DOCKER / "k8s/prometheusrule.yaml"
    if write:
        rule_path.write_text("# Generated from docker/prometheus/alerts.yml by tests/deploy/check.py --write.\n"
                             + yaml.safe_dump(rule_doc, sort_keys=False, width=120))
        print(f"wrote {rule_path}")
        k8s["PrometheusRule"] = [(rule_path.name, rule_doc)]
    got = k8s.get("PrometheusRule", [(None, {})])[0][1]
    check(got.get("spec") == rule_doc["spec"], "the PrometheusRule carries alerts.yml's groups (--write regenerates)")

    import kubernetes_validate

    version = "1.33"
    for kind in ["Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"]:
        for name, doc in k8s.get(kind, []):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                check(True, f"k8s {name}: {kind} validates against Kubernetes {version}")
            except Exception as e:  # noqa: BLE001 (the library raises several kinds)
                check(False, f"k8s {name}: {kind}: {e}")
    dep = k8s["Deployment"][0][1]["spec"]["template"]["spec"]
    ctr = dep["containers"][0]
    check(dep["securityContext"]["runAsUser"] == 10001, "Deployment runs as the image's user")
    check(ctr["resources"]["limits"].get("nvidia.com/gpu") == 1, "Deployment asks for a GPU")
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        check(ctr[probe]["httpGet"]["path"] == "/health", f"Deployment {probe} on /health")
    check(dep["terminationGracePeriodSeconds"] >= 60, "termination grace covers the drain")
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    keys = {line.split("`")[5] for line in (REPO / "docs/operations.md").read_text().splitlines()
            if line.startswith("| `") and line.count("`") >= 6}
    aliases = {"TANDEM_MODEL", "TANDEM_DEVICE", "TANDEM_API_KEYS", "TANDEM_ADMIN_KEYS"}
    for name in env:
        check(name in keys or name in aliases, f"Deployment env {name} is a variable tandem reads")
    hpa = k8s["HorizontalPodAutoscaler"][0][1]
    hpa_metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((DOCKER / "k8s/prometheus-adapter.yaml").read_text())["rules"]["custom"][0]
    series = re.match(r"([^{]+)", adapter["seriesQuery"]).group(1)
    renamed = re.sub(adapter["name"]["matches"], adapter["name"]["as"].replace("${1}", r"\1"), series)
    check(renamed == hpa_metric, f"the HPA's {hpa_metric} is the adapter's name for {series}")
    check_metric_names("HPA (through prometheus-adapter)", [series], served)
    sm = k8s["ServiceMonitor"][0][1]["spec"]
    check(sm["endpoints"][0]["path"] == "/metrics" and sm["endpoints"][0]["port"] == "http", "ServiceMonitor scrapes")
    pool = k8s["InferencePool"][0][1]
    check(pool["apiVersion"] == "inference.networking.k8s.io/v1", "InferencePool is the v1 API")
    spec = pool["spec"]
    check(spec["selector"]["matchLabels"] == k8s["Deployment"][0][1]["spec"]["selector"]["matchLabels"],
          "InferencePool selects the Deployment's pods")
    check([p["number"] for p in spec["targetPorts"]] == [8000] and spec["endpointPickerRef"]["name"],
          "InferencePool targets port 8000 with an endpoint picker")
    # What the endpoint picker scores pods by (vLLM's names, served as is).
    check_metric_names("InferencePool (endpoint picker)",
                       ["vllm:num_requests_waiting vllm:kv_cache_usage_perc vllm:lora_requests_info"], served)
    kust = yaml.safe_load((DOCKER / "k8s/kustomization.yaml").read_text())
    for r in kust["resources"]:
        check((DOCKER / "k8s" / r).exists(), f"kustomization lists {r}, which exists")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, type=pathlib.Path)
    ap.add_argument("--adapter", required=True, type=pathlib.Path)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    image_env = check_images()
    started = run_layout(args.root, image_env, args.adapter)
    served = set()
    if started:
        base, proc, _ = started
        try:
            served = served_names(traffic(base, args.root))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = None
            check(rc == 0, f"SIGTERM: the layout's server exits 0 (got {rc})")
    check_files(served, args.write)
    if FAILURES:
        print(f"\ndeploy check: {len(FAILURES)} FAILED")
        sys.exit(1)
    print("\ndeploy check: passed")


if __name__ == "__main__":
    main()
