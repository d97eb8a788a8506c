"""The official `openai` client (and raw httpx for bad input) against a running
OpenAI-compatible server. Written for tandem serving the default model
(Qwen2.5-Coder-0.5B-Instruct) on the CPU: every request is small, the whole file
takes well under two minutes on two cores.

Greedy (temperature 0) results are compared across requests (streamed vs not,
alone vs batched): tandem's results are batch invariant, so they must match
exactly.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime, then explain it."}]
# A chat prompt the model answers at length (it never ends within a few tokens).
LONG_CHAT = [{"role": "user", "content": "Write a detailed, 2000-word essay about the history of computing."}]
CODE_PROMPT = "def fibonacci(n):\n    "
ERROR_KEYS = {"message", "type", "param", "code"}


def chat(client, model, **kw):
    kw.setdefault("messages", CHAT)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=model, **kw)


def check_usage(usage) -> None:
    assert usage is not None, "response has no usage"
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def check_error_envelope(r: httpx.Response) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.headers, r.text)
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert ERROR_KEYS <= set(err), f"error envelope lacks {ERROR_KEYS - set(err)}: {body}"
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    return err


def pick_stop(text: str) -> str:
    """A short substring of `text`, starting about a third in, that does not occur earlier."""
    for start in range(max(1, len(text) // 3), len(text) - 3):
        for width in (4, 3, 5, 6):
            s = text[start : start + width]
            if len(s) == width and s.strip() and text.find(s) == start:
                return s
    pytest.fail(f"no usable stop string in {text!r}")


# ---------------------------------------------------------------- models, health


def test_health(http):
    assert http.get("/health").status_code == 200


def test_metrics_exposition_parses_whole(client, model, http):
    """/metrics is read by a Prometheus text-format parser (prometheus_client's),
    every family of it, and counts what this test did."""
    from prometheus_client.parser import text_string_to_metric_families

    def generated():
        fams = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        for name in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds",
                     "vllm:request_success", "tandem_model_info", "tandem_lora_slots_total"]:
            assert name in fams, f"{name} missing from {sorted(fams)}"
        assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
        return sum(s.value for s in fams["vllm:generation_tokens"].samples if s.name.endswith("_total"))

    before = generated()
    client.completions.create(model=model, prompt="one two", max_tokens=3, extra_body={"ignore_eos": True})
    assert generated() - before == 3


def test_models_list(client, model):
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert model in ids
    for m in page.data:
        assert m.object == "model"
        assert isinstance(m.owned_by, str)


def test_models_retrieve(client, model):
    """GET /v1/models/{model} (the client's models.retrieve)."""
    assert client.models.retrieve(model).id == model


# ---------------------------------------------------------------- chat / completions


def test_chat_completion_shape_and_usage(client, model):
    r = chat(client, model, temperature=0, max_tokens=16)
    assert r.object == "chat.completion"
    assert r.id and isinstance(r.created, int) and r.model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    check_usage(r.usage)
    assert 1 <= r.usage.completion_tokens <= 16
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_chat_without_max_tokens(client, model):
    """No max_tokens: the server's default limit applies; a short answer ends on its own."""
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Reply with the single word: yes"}], temperature=0
    )
    assert r.choices[0].finish_reason == "stop", r
    assert r.choices[0].message.content
    check_usage(r.usage)


def test_completion_shape_and_usage(client, model):
    r = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=16, temperature=0)
    assert r.object == "text_completion"
    assert r.id and isinstance(r.created, int) and r.model
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    check_usage(r.usage)
    assert 1 <= r.usage.completion_tokens <= 16


def test_completion_token_ids_prompt_counts_exactly(client, model):
    """A prompt given as token ids (OpenAI allows a list of ints) is counted exactly."""
    ids = [750, 75698, 1445, 982, 262]  # Qwen2 ids; any ids within the vocabulary will do
    r = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids), r.usage


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_length(client, model, field):
    r = client.chat.completions.create(model=model, messages=LONG_CHAT, temperature=0, **{field: 5})
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 5, r.usage
    check_usage(r.usage)


def test_completion_max_tokens_gives_length(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 7, r.usage


# ---------------------------------------------------------------- streaming


def test_stream_chat_matches_non_stream(client, model):
    ref = chat(client, model, temperature=0, max_tokens=24)
    stream = chat(client, model, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks, "empty stream"
    ids = {ch.id for ch in chunks}
    assert len(ids) == 1, f"chunks carry different ids: {ids}"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    *body, last = chunks
    # With include_usage the last chunk has no choices and the usage; the others have usage null.
    assert last.choices == [], last
    assert last.usage is not None, last
    assert all(ch.usage is None for ch in body), [ch.usage for ch in body if ch.usage is not None]
    text = "".join(ch.choices[0].delta.content or "" for ch in body if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in body if ch.choices and ch.choices[0].finish_reason]
    roles = [ch.choices[0].delta.role for ch in body if ch.choices and ch.choices[0].delta.role]
    assert text == ref.choices[0].message.content
    assert finishes == [ref.choices[0].finish_reason], finishes
    assert roles[:1] == ["assistant"], roles
    assert last.usage.completion_tokens == ref.usage.completion_tokens
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens
    check_usage(last.usage)


def test_stream_without_include_usage_has_no_usage_chunk(client, model):
    chunks = list(chat(client, model, temperature=0, max_tokens=6, stream=True))
    assert chunks and all(ch.choices for ch in chunks), "a chunk without choices although include_usage was not asked"
    assert all(ch.usage is None for ch in chunks)


def test_stream_completion_matches_non_stream(client, model):
    ref = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(
            model=model, prompt=CODE_PROMPT, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == ref.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [ref.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens


def test_stream_client_disconnect_leaves_server_healthy(client, model, http):
    with chat(client, model, messages=LONG_CHAT, temperature=0, max_tokens=200, stream=True) as stream:
        for i, _ in enumerate(stream):
            if i >= 2:
                break  # closing the stream drops the connection mid-generation
    assert http.get("/health").status_code == 200
    r = chat(client, model, temperature=0, max_tokens=4)
    assert r.choices[0].message.content


# ---------------------------------------------------------------- n, stop, seed, batching


def test_n_2(client, model):
    r = chat(client, model, n=2, temperature=0.8, seed=3, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    check_usage(r.usage)
    assert 2 <= r.usage.completion_tokens <= 16  # both choices counted


def test_n_2_stream(client, model):
    chunks = list(chat(client, model, n=2, temperature=0.8, seed=3, max_tokens=6, stream=True))
    seen = {ch.choices[0].index for ch in chunks if ch.choices}
    assert seen == {0, 1}
    finished = [c.index for ch in chunks for c in ch.choices if c.finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_sequence_chat(client, model):
    ref = chat(client, model, temperature=0, max_tokens=24).choices[0].message.content
    stop = pick_stop(ref)
    r = chat(client, model, temperature=0, max_tokens=24, stop=[stop])
    out = r.choices[0].message.content
    assert stop not in out, (stop, out)
    assert r.choices[0].finish_reason == "stop"
    assert out == ref[: ref.find(stop)], (stop, ref, out)


def test_stop_sequence_stream(client, model):
    ref = chat(client, model, temperature=0, max_tokens=24).choices[0].message.content
    stop = pick_stop(ref)
    chunks = list(chat(client, model, temperature=0, max_tokens=24, stop=stop, stream=True))
    out = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert stop not in out, (stop, out)
    assert out == ref[: ref.find(stop)], (stop, ref, out)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"]


def test_stop_sequence_completion(client, model):
    ref = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = pick_stop(ref)
    r = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=24, temperature=0, stop=[stop, "zzzz-never"])
    assert stop not in r.choices[0].text
    assert r.choices[0].text == ref[: ref.find(stop)], (stop, ref, r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible(client, model):
    a = chat(client, model, temperature=1.0, seed=7, max_tokens=12).choices[0].message.content
    b = chat(client, model, temperature=1.0, seed=7, max_tokens=12).choices[0].message.content
    assert a == b
    others = {chat(client, model, temperature=1.0, seed=s, max_tokens=12).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) >= 2, f"four seeds, one text: {a!r}"


def test_greedy_same_alone_and_batched(client, model):
    alone = chat(client, model, temperature=0, max_tokens=12).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: chat(client, model, temperature=0, max_tokens=12).choices[0].message.content, range(4)))
    assert outs == [alone] * 4


# ---------------------------------------------------------------- logprobs


def test_chat_logprobs(client, model):
    r = chat(client, model, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    assert c.logprobs is not None and c.logprobs.content is not None
    entries = c.logprobs.content
    assert len(entries) == r.usage.completion_tokens, (len(entries), r.usage)
    for e in entries:
        assert isinstance(e.token, str)
        assert e.logprob <= 0.0
        assert len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True), lps
        assert all(lp <= 0.0 for lp in lps)
        # Greedy: the chosen token is the most likely one.
        assert e.token == e.top_logprobs[0].token
        assert e.logprob == pytest.approx(lps[0], abs=1e-4)
    if all(e.bytes is not None for e in entries):
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == c.message.content
    else:
        assert "".join(e.token for e in entries) == c.message.content


def test_chat_logprobs_stream(client, model):
    chunks = list(chat(client, model, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True}))
    entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content or []]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_completion_logprobs(client, model):
    r = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tlp <= 0.0
        assert len(top) == 2
        assert max(top.values()) == pytest.approx(tlp, abs=1e-4)  # greedy: chosen is the best
        assert tok in top


def test_completion_echo(client, model):
    r = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=4, temperature=0)
    e = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text == CODE_PROMPT + r.choices[0].text
    assert (e.usage.prompt_tokens, e.usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_completion_logprobs_echo(client, model):
    r = client.completions.create(model=model, prompt=CODE_PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text.startswith(CODE_PROMPT), c.text
    lp = c.logprobs
    total = r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == total
    assert "".join(lp.tokens) == c.text
    # The first prompt token has nothing before it: no logprob.
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for top in lp.top_logprobs[1:]:
        # top-2, plus the actual token where it is not among them (prompt tokens)
        assert 2 <= len(top) <= 3


# ---------------------------------------------------------------- bad input: 4xx, never 5xx

V1 = "/v1/chat/completions"


def post_raw(http, path, content, headers=None):
    return http.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})


def test_malformed_json(http):
    r = post_raw(http, V1, b'{"model": "x", "messages": [')
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


def test_not_json_object(http):
    r = post_raw(http, V1, b"[1, 2, 3]")
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


def test_wrong_type_max_tokens(http, model):
    r = http.post(V1, json={"model": model, "messages": CHAT, "max_tokens": "ten"})
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


def test_missing_messages(http, model):
    r = http.post(V1, json={"model": model})
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


def test_empty_messages(http, model):
    r = http.post(V1, json={"model": model, "messages": [], "max_tokens": 4})
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


def test_unknown_model(http):
    r = http.post(V1, json={"model": "no-such-model", "messages": CHAT, "max_tokens": 4})
    assert r.status_code == 404, (r.status_code, r.text)
    err = check_error_envelope(r)
    assert err["param"] == "model" or "no-such-model" in err["message"], err


def test_unknown_model_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)


@pytest.mark.parametrize("path", [V1, "/v1/completions"])
@pytest.mark.parametrize("max_tokens", [-1, 0, 10**9])
def test_bad_max_tokens(http, model, path, max_tokens):
    body = {"model": model, "max_tokens": max_tokens}
    body |= {"messages": CHAT} if path == V1 else {"prompt": CODE_PROMPT}
    r = http.post(path, json=body)
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": -1},
        {"top_p": 1.5},
        {"n": 0},
        {"logprobs": True, "top_logprobs": 1000},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"stop": 5},
    ],
    ids=["temperature<0", "top_p>1", "n=0", "top_logprobs=1000", "bad-role", "stop-int"],
)
def test_bad_parameters(http, model, extra):
    body = {"model": model, "messages": CHAT, "max_tokens": 4} | extra
    r = http.post(V1, json=body)
    assert r.status_code == 400, (body, r.status_code, r.text)
    check_error_envelope(r)


def test_streamed_bad_request_is_plain_error(http, model):
    """Validation happens before streaming starts: a 400 JSON error, not a 200 event stream."""
    r = http.post(V1, json={"model": model, "messages": CHAT, "max_tokens": -1, "stream": True})
    assert r.status_code == 400, (r.status_code, r.text)
    check_error_envelope(r)


def test_unknown_route_and_method(http):
    r = http.get("/v1/no-such-route")
    assert r.status_code == 404, (r.status_code, r.text)
    r = http.get(V1)
    assert r.status_code == 405, (r.status_code, r.text)


def test_no_5xx_on_odd_but_valid_input(client, model):
    # Unicode, an empty user message, a system-only conversation: all must be served.
    for messages in (
        [{"role": "user", "content": "日本語で答えて。🙂 \u0000?"}],
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        check_usage(r.usage)
        json.dumps(r.model_dump())
