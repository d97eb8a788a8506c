"""Fixtures for the HTTP tests: a running OpenAI-compatible server at
$TANDEM_BASE_URL (default http://127.0.0.1:8000; tests/py/run.sh starts tandem
and sets it)."""

import os

import httpx
import openai
import pytest

BASE_URL = os.environ.get("TANDEM_BASE_URL", "http://127.0.0.1:8000").rstrip("/")


@pytest.fixture(scope="session")
def base_url() -> str:
    return BASE_URL


@pytest.fixture(scope="session")
def client() -> openai.OpenAI:
    # No retries: a retried request would hide a failure.
    return openai.OpenAI(base_url=BASE_URL + "/v1", api_key="unused", max_retries=0, timeout=120.0)


@pytest.fixture(scope="session")
def http() -> httpx.Client:
    with httpx.Client(base_url=BASE_URL, timeout=120.0) as c:
        yield c


@pytest.fixture(scope="session")
def model(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert models, "GET /v1/models lists no model"
    return models[0].id
