#!/usr/bin/env python3
"""Drives a pruneserve server with the unmodified OpenAI Python SDK.

stdin:  {"base_url": "http://127.0.0.1:PORT/v1", "api_key": KEY}
stdout: JSON of what the SDK saw (the Rust test asserts on it).
"""
import json
import sys

from openai import OpenAI


def main():
    cfg = json.load(sys.stdin)
    client = OpenAI(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0)
    out = {"models": [m.id for m in client.models.list().data]}

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=16, temperature=0, stream=True,
        logprobs=True, top_logprobs=2, stream_options={"include_usage": True},
    )
    text, chunks, usage = "", 0, None
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
    out["chat_text"], out["chat_chunks"] = text, chunks
    out["chat_usage"] = usage.model_dump() if usage else None
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0)
    out["chat_text_non_stream"] = whole.choices[0].message.content

    comp = client.completions.create(model="rev25", prompt="The sky is", max_tokens=8, temperature=0, logprobs=2)
    out["completion_text"] = comp.choices[0].text
    out["completion_logprobs"] = comp.choices[0].logprobs.token_logprobs
    streamed = client.completions.create(model="rev25", prompt="The sky is", max_tokens=8, temperature=0, stream=True)
    out["stream_completion_text"] = "".join(c.choices[0].text for c in streamed if c.choices)

    prompt = [1, 504, 3458, 314, 2]
    echo = client.completions.create(model="rev25", prompt=[prompt], max_tokens=1, temperature=0, echo=True, logprobs=1)
    out["echo_len"] = len(echo.choices[0].logprobs.token_logprobs)
    out["prompt_len"] = len(prompt)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
