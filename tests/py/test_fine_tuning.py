"""The files and fine-tuning APIs through the official `openai` client, against
tandem serving the default model with a data directory (tests/py/run.sh starts
it with --data-dir).

The default model learns four invented facts (tests/fixtures/train-data, made
by scripts/fixtures/learn_data.py) in six optimiser steps, trained on the
serving engine between serving steps while other clients stream from the base
model the whole time; then the fine-tuned model and a checkpoint answer, and
the base model still does not know the facts.
"""

from __future__ import annotations

import pathlib
import threading
import time

import httpx
import openai
import pytest

DATA = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "train-data"
QUESTION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of Zorbania?"},
]


def wait(client: openai.OpenAI, job_id: str, until, timeout_s: float = 900):
    deadline = time.time() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        assert time.time() < deadline, f"job {job_id} stuck in {job.status}"
        time.sleep(0.5)


def finished(job) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")


def ask(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
    return r.choices[0].message.content


def test_files_round_trip(client: openai.OpenAI) -> None:
    raw = (DATA / "facts.valid.jsonl").read_bytes()
    f = client.files.create(file=("facts.jsonl", raw), purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes == len(raw) and f.filename == "facts.jsonl"
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list(purpose="fine-tune").data]
    assert client.files.content(f.id).read() == raw
    d = client.files.delete(f.id)
    assert d.deleted and d.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", b"{not json\n"), purpose="fine-tune")
    assert "line 1" in e.value.body["message"]


def test_cancel_pause_resume(client: openai.OpenAI, model: str) -> None:
    train = client.files.create(file=("t.jsonl", (DATA / "facts.train.jsonl").read_bytes()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
        extra_body={"tandem": {"rank": 2, "targets": ["q_proj"], "max_steps": 20}},
    )
    job = wait(client, job.id, lambda j: j.status in ("running", "failed"))
    assert job.status == "running", job.error
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert "Job paused" in messages and "Job cancelled" in messages, messages


def test_the_default_model_learns_while_others_stream(client: openai.OpenAI, model: str, base_url: str) -> None:
    before = ask(client, model)
    assert "Quellport" not in before
    train = client.files.create(file=("facts.train.jsonl", (DATA / "facts.train.jsonl").read_bytes()), purpose="fine-tune")
    valid = client.files.create(file=("facts.valid.jsonl", (DATA / "facts.valid.jsonl").read_bytes()), purpose="fine-tune")

    # Clients streaming from the base model for the whole job: all must succeed.
    stop = threading.Event()
    results: list[str] = []

    def stream_forever() -> None:
        c = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        while not stop.is_set():
            try:
                chunks = c.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=12, stream=True
                )
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                results.append("ok" if text else "empty")
            except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the test
                results.append(f"error: {e!r}")

    streams = [threading.Thread(target=stream_forever) for _ in range(2)]
    for t in streams:
        t.start()
    try:
        job = client.fine_tuning.jobs.create(
            model=model,
            training_file=train.id,
            validation_file=valid.id,
            suffix="facts",
            seed=42,
            metadata={"suite": "pytest"},
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 4}},
            },
            extra_body={"tandem": {"learning_rate": 3e-3, "rank": 8, "dropout": 0.0, "save_every": 3}},
        )
        assert job.status == "validating_files"
        assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
        job = wait(client, job.id, finished)
    finally:
        stop.set()
        for t in streams:
            t.join()
    assert job.status == "succeeded", job.error
    assert results and all(r == "ok" for r in results), results
    assert job.fine_tuned_model == f"ft:{model}:tandem:facts:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.result_files

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert len(metrics) == 6
    first_valid = [e.data["valid_loss"] for e in reversed(events) if e.type == "metrics" and "valid_loss" in (e.data or {})]
    assert first_valid[-1] < 0.5 * first_valid[0], first_valid

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [3]
    ckpt = checkpoints[0].fine_tuned_model_checkpoint
    assert ckpt == f"{job.fine_tuned_model}:ckpt-step-3"

    assert "Quellport" in ask(client, job.fine_tuned_model)
    ask(client, ckpt)  # servable
    assert "Quellport" not in ask(client, model), "the base model must be unchanged"
    ids = {m.id: m for m in client.models.list().data}
    assert job.fine_tuned_model in ids and ckpt in ids
    card = httpx.get(f"{base_url}/v1/models/{job.fine_tuned_model}", timeout=30).json()
    assert card["lineage"]["job"] == job.id
    assert card["lineage"]["data"]["train"]["file"]["path"] == train.id
    csv = client.files.content(job.result_files[0]).read().decode()
    assert csv.startswith("step,train_loss") and len(csv.strip().splitlines()) == 7, csv
