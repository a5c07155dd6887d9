#!/usr/bin/env python3
"""End to end with the official `openai` package against a running Strata.

    python tests/e2e/openai_client.py http://127.0.0.1:PORT/v1

A chat, a streamed chat with usage, and a completion, each reply parsed
into the package's typed models; a second identical chat must report
cached prompt tokens. Exits non-zero (with the reason) on any mismatch.
`.ci/run` runs it against `strata serve` with the default model.
"""

import json
import sys
import time
import urllib.error
import urllib.request

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel


def check(cond, what):
    if not cond:
        raise SystemExit(f"e2e: {what}")


def wait_ready(base, seconds=180):
    """Polls /health until it answers 200 (503 while the model loads)."""
    url = base.rsplit("/v1", 1)[0] + "/health"
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"e2e: {url} not ready after {seconds} s")
        time.sleep(0.1)


def main():
    base = sys.argv[1]
    wait_ready(base)
    client = openai.OpenAI(base_url=base, api_key="unused")
    models = client.models.list()
    model = models.data[0].id
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    chat = client.chat.completions.create(
        model=model, messages=ask, max_tokens=24, temperature=0
    )
    check(isinstance(chat, ChatCompletion), "chat is not a ChatCompletion")
    text = chat.choices[0].message.content
    check(bool(text and text.strip()), "empty chat answer")
    check(chat.choices[0].finish_reason in ("stop", "length"), "finish reason")
    check(chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, "usage")

    again = client.chat.completions.create(
        model=model, messages=ask, max_tokens=24, temperature=0
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    check(cached > 0, f"the repeated prompt reported {cached} cached tokens")
    check(again.choices[0].message.content == text, "greedy answers differ")

    pieces = []
    usage = None
    finish = None
    stream = client.chat.completions.create(
        model=model,
        messages=ask,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        check(isinstance(chunk, ChatCompletionChunk), "chunk type")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(pieces) == text, "streamed text differs from the whole answer")
    check(finish in ("stop", "length"), "no finish reason in the stream")
    check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens, "stream usage")

    comp = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    check(isinstance(comp, Completion), "completion type")
    check(bool(comp.choices[0].text), "empty completion")

    try:
        client.chat.completions.create(model=model, messages=ask, temperature=5)
        check(False, "temperature 5 was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "bad temperature status")
    try:
        client.chat.completions.create(model="no-such-model", messages=ask)
        check(False, "an unknown model was accepted")
    except openai.NotFoundError:
        pass

    structured(client, model)
    tools(client, model)

    print(f"e2e: ok ({model}): {text!r}; cached {cached} tokens on repeat")


class City(BaseModel):
    name: str
    country: str
    population: int


def structured(client, model):
    """The openai package's parse() with a Pydantic model: the answer is
    JSON of the model's strict schema, parsed into it."""
    # The helper moved out of `beta` in newer versions of the package.
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(
        model=model,
        messages=[{"role": "user", "content": "Paris is the capital of France; 2102650 people live there. Give its name, country and population."}],
        response_format=City,
        max_tokens=120,
        temperature=0,
    )
    city = r.choices[0].message.parsed
    check(isinstance(city, City), f"parse gave {city!r}")
    check(r.choices[0].finish_reason == "stop", f"parse finish {r.choices[0].finish_reason}")


def tools(client, model):
    """A required tool call: parsed by the package into tool_calls, with
    JSON arguments that follow the function's parameters."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    c = r.choices[0]
    check(c.finish_reason == "tool_calls", f"tool finish {c.finish_reason}")
    call = c.message.tool_calls[0]
    check(call.function.name == "get_weather", f"called {call.function.name}")
    args = json.loads(call.function.arguments)
    check(isinstance(args.get("city"), str), f"arguments {args}")


if __name__ == "__main__":
    main()
