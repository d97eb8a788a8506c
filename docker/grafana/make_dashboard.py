#!/usr/bin/env python3
"""Writes docker/grafana/dashboards/tandem.json, the Grafana dashboard of
docker/compose.yaml (and docker/k8s): one row each for serving, adapters,
routes and training. Rerun after changing a panel; tests/deploy checks the
committed file is this script's output, that every metric it names is served
by /metrics, and that every query parses (promtool)."""
import json
import pathlib

DS = {"type": "prometheus", "uid": "prometheus"}
RATE = "[$__rate_interval]"


def q(expr, legend):
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric, by="", label=""):
    """p50 and p99 of a histogram, optionally per label."""
    keep = f"le{', ' + by if by else ''}"
    return [
        q(f"histogram_quantile({p}, sum by ({keep}) (rate({metric}_bucket{RATE})))", f"p{int(p * 100)}{label}")
        for p in (0.5, 0.99)
    ]


ROWS = [
    ("Serving", [
        ("Tokens per second", "short", [
            q(f"sum(rate(vllm:generation_tokens_total{RATE}))", "generated"),
            q(f"sum(rate(vllm:prompt_tokens_total{RATE}))", "prompt"),
        ]),
        ("Requests finished, by reason", "reqps", [
            q(f"sum by (finished_reason) (rate(vllm:request_success_total{RATE}))", "{{finished_reason}}"),
        ]),
        ("HTTP responses, by status", "reqps", [
            q(f"sum by (status) (rate(tandem_http_responses_total{RATE}))", "{{status}}"),
        ]),
        ("Time to first token", "s", quantiles("vllm:time_to_first_token_seconds")),
        ("Time per output token (inter-token)", "s", quantiles("vllm:time_per_output_token_seconds")),
        ("Time waiting in the queue", "s", quantiles("vllm:request_queue_time_seconds")),
        ("Requests running and waiting", "short", [
            q("sum(vllm:num_requests_running)", "running"),
            q("sum(vllm:num_requests_waiting)", "waiting"),
        ]),
        ("KV cache usage", "percentunit", [
            q("avg(vllm:kv_cache_usage_perc)", "used"),
            q(f"sum(rate(vllm:num_preemptions_total{RATE}))", "preemptions/s"),
        ]),
        ("Prefix-cache hit rate", "percentunit", [
            q(f"sum(rate(vllm:prefix_cache_hits_total{RATE})) / sum(rate(vllm:prefix_cache_queries_total{RATE}))",
              "hit rate"),
        ]),
        ("Engine alive", "short", [q("min(tandem_engine_alive)", "alive")]),
    ]),
    ("Adapters", [
        ("Adapter slots", "short", [
            q("sum(tandem_lora_slots_occupied)", "occupied"),
            q("sum(tandem_lora_slots_pinned)", "pinned"),
            q("sum(tandem_lora_slots_total)", "total"),
        ]),
        ("Adapter loads and evictions", "ops", [
            q(f"sum(rate(tandem_lora_slot_loads_total{RATE}))", "slot loads"),
            q(f"sum(rate(tandem_lora_slot_evictions_total{RATE}))", "slot evictions"),
            q(f"sum(rate(tandem_lora_disk_loads_total{RATE}))", "disk loads"),
        ]),
        ("Requests by adapter", "reqps", [
            q(f"sum by (adapter) (rate(tandem_lora_requests_total{RATE}))", "{{adapter}}"),
        ]),
        ("Generated tokens by adapter", "short", [
            q(f"sum by (adapter) (rate(tandem_lora_generation_tokens_total{RATE}))", "{{adapter}}"),
        ]),
    ]),
    ("Routes (canary, A/B, shadow)", [
        ("Split per alias", "reqps", [
            q(f"sum by (alias, target) (rate(tandem_route_requests_total{RATE}))", "{{alias}} -> {{target}}"),
        ]),
        ("Error ratio per target", "percentunit", [
            q(f"sum by (alias, target) (rate(tandem_route_errors_total{RATE})) / "
              f"sum by (alias, target) (rate(tandem_route_requests_total{RATE}))", "{{alias}} -> {{target}}"),
        ]),
        ("Time to first byte per target, p99", "s", [
            q(f"histogram_quantile(0.99, sum by (le, alias, target) (rate(tandem_route_first_byte_seconds_bucket{RATE})))",
              "{{alias}} -> {{target}}"),
        ]),
        ("Shadow agreement", "percentunit", [
            q(f'sum by (alias, target) (rate(tandem_route_shadow_comparisons_total{{outcome="agree"}}{RATE})) / '
              f"sum by (alias, target) (rate(tandem_route_shadow_comparisons_total{RATE}))",
              "{{alias}} shadow {{target}}"),
        ]),
    ]),
    ("Training", [
        ("Fine-tuning jobs, by status", "short", [q("sum by (status) (tandem_train_jobs)", "{{status}}")]),
        ("Training loss", "short", [q("tandem_train_loss", "{{instance}}")]),
        ("Training tokens per second", "short", [q("tandem_train_tokens_per_second", "{{instance}}")]),
        ("Serving steps delayed by training", "ops", [
            q(f"sum(rate(tandem_train_serving_steps_delayed_total{RATE}))", "delayed steps/s"),
        ]),
    ]),
]


def dashboard():
    panels, y, pid = [], 0, 1
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (ptitle, unit, targets) in enumerate(row):
            panels.append({
                "type": "timeseries", "title": ptitle, "id": pid, "datasource": DS,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [dict(t, refId=chr(ord("A") + k), datasource=DS) for k, t in enumerate(targets)],
            })
            pid += 1
        y += 8 * ((len(row) + 2) // 3)
    return {
        "uid": "tandem", "title": "tandem", "tags": ["tandem", "llm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "10s", "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "panels": panels, "templating": {"list": []},
        "annotations": {"list": []},
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).parent / "dashboards" / "tandem.json"
    out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {out}")
