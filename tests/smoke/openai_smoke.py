"""Smoke test with the official `openai` client against a running `quiver serve` (demo model).

Every response body and every stream chunk is also validated against the client's own pydantic
types (`model_validate`, which checks field types and literals, unlike the client's lenient
parsing), so a shape the client would merely tolerate still fails here.

Usage: python tests/smoke/openai_smoke.py http://127.0.0.1:PORT/v1
Exits non-zero on any failure.
"""

import json
import sys
import urllib.request

from openai import BadRequestError, NotFoundError, OpenAI
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk


def sse_chunks(base_url: str, path: str, body: dict) -> list[dict]:
    """POSTs a streaming request and returns the JSON of every `data:` frame before [DONE]."""
    frames = []
    req = urllib.request.Request(
        f"{base_url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200, r.read()
        for line in r.read().decode().splitlines():
            if line.startswith("data: "):
                frames.append(line[len("data: "):])
    assert frames and frames[-1] == "[DONE]", frames[-3:]
    return [json.loads(f) for f in frames[:-1]]


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused")
    checks = 0

    raw = client.models.with_raw_response.list()
    cards = [Model.model_validate(m) for m in json.loads(raw.text)["data"]]
    models = [m.id for m in cards]
    assert "quiver-demo" in models and len(models) >= 2, models
    adapter = next(m for m in models if m != "quiver-demo")
    checks += 1

    raw = client.chat.completions.with_raw_response.create(
        model=adapter, messages=[{"role": "user", "content": "Hello!"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2,
    )
    chat = ChatCompletion.model_validate(json.loads(raw.text))
    assert chat.model == adapter, chat.model
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens >= 1
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    checks += 1

    body = {"model": "quiver-demo", "messages": [{"role": "user", "content": "Stream please"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}, "n": 2, "ignore_eos": True}
    chunks = [ChatCompletionChunk.model_validate(c) for c in sse_chunks(base_url, "/chat/completions", body)]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10, chunks[-1]
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason == "length") == 2
    # Sampled (temperature 1): without ignore_eos a choice may end early on EOS.
    stream = client.chat.completions.create(**{k: v for k, v in body.items() if k not in ("stream", "ignore_eos")},
                                            stream=True, extra_body={"ignore_eos": True})
    assert list(stream)[-1].usage.completion_tokens == 10
    checks += 1

    raw = client.completions.with_raw_response.create(model=adapter, prompt=["one", "two"], max_tokens=3, logprobs=2)
    comp = Completion.model_validate(json.loads(raw.text))
    assert len(comp.choices) == 2 and comp.choices[0].logprobs is not None
    assert len(comp.choices[0].logprobs.tokens) == 3
    body = {"model": adapter, "prompt": "one", "max_tokens": 3, "stream": True, "logprobs": 1}
    raw_chunks = sse_chunks(base_url, "/completions", body)
    # OpenAI's completion stream sends `finish_reason: null` before the last chunk although the
    # client's `Completion` type (used for chunks too) declares it non-null: check that field by
    # hand there and validate everything else.
    for c in raw_chunks[:-1]:
        assert all(ch["finish_reason"] is None for ch in c["choices"]), c
        Completion.model_validate({**c, "choices": [{**ch, "finish_reason": "length"} for ch in c["choices"]]})
    last = Completion.model_validate(raw_chunks[-1])
    assert last.choices[0].finish_reason == "length", last
    checks += 1

    # A stop string ends the choice with "stop"; the text stops before it.
    full = client.completions.create(model="quiver-demo", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    if len(full) >= 3:
        stop = full[1:3]
        cut = client.completions.create(model="quiver-demo", prompt="abc", max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop", cut
        assert cut.choices[0].text == full[: full.index(stop)], (cut.choices[0].text, full, stop)
    checks += 1

    try:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
        raise AssertionError("unknown model must be a 404")
    except NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    for extra in ({"frobnicate": 1}, {"response_format": {"type": "json_object"}}):
        for stream in (False, True):
            try:
                client.chat.completions.create(
                    model="quiver-demo", messages=[{"role": "user", "content": "x"}], max_tokens=1, stream=stream,
                    extra_body=extra,
                )
                raise AssertionError(f"{extra} must be refused")
            except BadRequestError as e:
                assert e.body["param"] == next(iter(extra)), e.body
    checks += 1
    print(f"openai-smoke: {checks} passed, 0 failed")


if __name__ == "__main__":
    main(sys.argv[1])
