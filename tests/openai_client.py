"""The Python `openai` package against a running `specula serve`.

Usage: python tests/openai_client.py BASE_URL API_KEY MODEL
(BASE_URL ends in /v1). Run by tests/server_http.rs when a Python with `openai` exists.
"""

import sys

import openai


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    full = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert text, full
    assert full.choices[0].finish_reason in ("stop", "length"), full
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens, full.usage

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    assert streamed == text, (streamed, text)
    assert finish == full.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens, usage

    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=-1)
        raise AssertionError("a negative temperature was accepted")
    except openai.BadRequestError as e:
        assert "temperature" in str(e), e

    bad_key = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    try:
        bad_key.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass

    assert [m.id for m in client.models.list()] == [model]
    print(f"openai client: ok ({text!r})")


if __name__ == "__main__":
    main()
