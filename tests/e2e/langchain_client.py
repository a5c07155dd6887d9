#!/usr/bin/env python3
"""End to end with LangChain's ChatOpenAI against a running Strata.

    python tests/e2e/langchain_client.py http://127.0.0.1:PORT/v1

invoke and stream, each reply parsed into LangChain's typed messages
(AIMessage, AIMessageChunk) with the usage it reports; a streamed reply
reassembles to text; bind_tools with a named function gives the call;
with_structured_output (JSON schema and function calling) gives the
Pydantic object. Exits non-zero (with the reason) on any mismatch.
`.ci/run` runs it against `strata serve` with the default model, after
tests/e2e/openai_client.py (which waits for the model to load).
"""

import sys

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel


def check(cond, what):
    if not cond:
        raise SystemExit(f"langchain e2e: {what}")


def main():
    base = sys.argv[1]
    import openai

    model = openai.OpenAI(base_url=base, api_key="unused").models.list().data[0].id
    llm = ChatOpenAI(
        base_url=base,
        api_key="unused",
        model=model,
        temperature=0,
        max_tokens=16,
        stream_usage=True,
    )
    ask = [SystemMessage("Answer in one short sentence."), HumanMessage("What is the capital of France?")]
    reply = llm.invoke(ask)
    check(isinstance(reply, AIMessage), f"invoke gave {type(reply)}")
    check(isinstance(reply.content, str) and reply.content.strip(), f"empty reply: {reply!r}")
    usage = reply.usage_metadata
    check(usage and usage["input_tokens"] > 0 and usage["output_tokens"] > 0, f"usage: {usage}")
    check(reply.response_metadata.get("finish_reason") in ("stop", "length"), f"{reply.response_metadata}")
    chunks = list(llm.stream(ask))
    check(chunks and all(isinstance(c, AIMessageChunk) for c in chunks), "stream gave no chunks")
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    check(whole.content == reply.content, f"streamed {whole.content!r} != invoked {reply.content!r}")
    check(whole.usage_metadata and whole.usage_metadata["output_tokens"] > 0, f"stream usage: {whole.usage_metadata}")

    # bind_tools with a named function: the reply carries the call, its
    # arguments parsed by LangChain.
    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    call = ChatOpenAI(base_url=base, api_key="unused", model=model, temperature=0, max_tokens=80)
    tooled = call.bind_tools([get_weather], tool_choice="get_weather")
    r = tooled.invoke([HumanMessage("What is the weather in Paris?")])
    check(r.tool_calls and r.tool_calls[0]["name"] == "get_weather", f"bind_tools: {r!r}")
    check(isinstance(r.tool_calls[0]["args"].get("city"), str), f"bind_tools args: {r.tool_calls}")

    # with_structured_output, as a JSON schema and as a function call.
    class City(BaseModel):
        name: str
        country: str

    for method in ("json_schema", "function_calling"):
        city = call.with_structured_output(City, method=method).invoke(
            [HumanMessage("Name a city in France.")]
        )
        check(isinstance(city, City), f"with_structured_output({method}): {city!r}")
    print(f"langchain e2e: ok ({model}): {reply.content!r}")


if __name__ == "__main__":
    main()
