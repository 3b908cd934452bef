"""Smoke test with the official `openai` client against a running `quiver serve` (demo model).

Usage: python tests/smoke/openai_smoke.py http://127.0.0.1:PORT/v1
Exits non-zero on any failure.
"""

import sys

from openai import NotFoundError, OpenAI


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert "quiver-demo" in models and len(models) >= 2, models
    adapter = next(m for m in models if m != "quiver-demo")

    chat = client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "Hello!"}], max_tokens=5, temperature=0
    )
    assert chat.model == adapter, chat.model
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens >= 1

    stream = client.chat.completions.create(
        model="quiver-demo",
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5, chunks[-1]
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)

    comp = client.completions.create(model=adapter, prompt=["one", "two"], max_tokens=3, logprobs=2)
    assert len(comp.choices) == 2 and comp.choices[0].logprobs is not None
    assert len(comp.choices[0].logprobs.tokens) == 3

    try:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
        raise AssertionError("unknown model must be a 404")
    except NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    print("openai-smoke: 4 passed, 0 failed")


if __name__ == "__main__":
    main(sys.argv[1])
