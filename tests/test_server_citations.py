"""Browser citations through the server, seen by the openai client (strict mode): a scripted
model searches a SearXNG-format endpoint and opens a page, both served on 127.0.0.1, then
answers citing it. Its `【cursor†Lx-Ly】` markers stay in the text; the valid one becomes a
`url_citation` spanning it (Responses: on the output_text part and as
`response.output_text.annotation.added` events; Chat: on the message, and in one streamed
delta); a cursor never opened and a range past the page's end stay plain text."""
from __future__ import annotations

import json
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import openai
import pytest
from helpers import local_site
from scripted import ScriptedModel, harmony

from mlx_gptoss.server import create_app, running
from mlx_gptoss.tools.browser import BrowserTool, citations
from mlx_gptoss.tools.web import Page

NAME = "gpt-oss-test"
TITLE = "Lazy arrays"
PAGE = (f"<html><head><title>{TITLE}</title></head><body><h1>MLX</h1>"
        "<p>MLX computes lazily.</p><p>Arrays live in unified memory.</p></body></html>")
VALID, UNOPENED, PAST_THE_END = "\u30101\u2020L2-L3\u3011", "\u30107\u2020L1\u3011", "\u30101\u2020L999\u3011"
ANSWER = f"MLX is lazy {VALID}; see {UNOPENED} and {PAST_THE_END}."
ROUNDS = [
    "<|channel|>analysis to=browser.search code<|message|>{\"query\": \"mlx\"}<|call|>",
    "<|channel|>analysis to=browser.open code<|message|>{\"id\": 0}<|call|>",
    f"<|channel|>final<|message|>{ANSWER}<|return|>",
]


class Site(BaseHTTPRequestHandler):
    """`/search` in SearXNG's JSON format, whose one result is `/page`."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if url.path == "/search":
            query = parse_qs(url.query)["q"][0]
            body = json.dumps({"query": query, "results": [
                {"title": "MLX docs", "url": f"{base}/page", "content": "About MLX."}]}).encode()
            kind = "application/json"
        else:
            body, kind = PAGE.encode(), "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site():
    with local_site(Site) as url:
        yield url


class ContextModel(ScriptedModel):
    """The scripted rounds, recording the whole prompt of a request's first round when the
    model reads its end (a prompt the server's cache holds whole is not read again). Asked
    to answer "from memory", it writes the cited answer at once, without browsing."""

    def __init__(self, tok):
        super().__init__([harmony(r) for r in ROUNDS])
        self.browsing, self.answer_only = self.responses, [harmony(ROUNDS[-1])]
        self.from_memory = tok.encode(" from memory")
        self.first_prompts: list[list[int]] = []

    def next_token(self, context: list[int]) -> int:
        n = len(self.from_memory)
        memory = any(context[i:i + n] == self.from_memory for i in range(len(context) - n + 1))
        self.responses = self.answer_only if memory else self.browsing
        return super().next_token(context)

    def __call__(self, inputs, cache=None, **options):
        logits = super().__call__(inputs, cache=cache, **options)
        context = cache[0].tokens
        if context[-len(self.assistant_start):] == self.assistant_start and self.call not in context:
            self.first_prompts.append(list(cache[0].tokens))
        return logits


@contextmanager
def serving(site: str, tok):
    model = ContextModel(tok)
    app = create_app(model, tok, served_name=NAME, builtin_tools={
        "browser": lambda: BrowserTool(f"searxng:{site}", allow_private=True)})
    with running(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                            _strict_response_validation=True), model


def expected(site: str) -> dict:
    start = ANSWER.index(VALID)
    return {"start_index": start, "end_index": start + len(VALID), "url": f"{site}/page",
            "title": TITLE}


def test_citations_span_markers_of_opened_pages_only():
    """The helper the server uses: spans of the text itself, hostile markers dropped."""
    url = "https://example.org/a"
    pages = [Page("", "results", "\nsearch page"), Page(url, "A", "\nURL: x\none\ntwo\nthree")]
    text = ("\u30100\u2020L1\u3011 \u30101\u2020L2-L4\u3011 \u30101\u2020L5\u3011 "
            "\u30101\u2020L3-L2\u3011 \u30102\u2020L1\u3011 \u30101\u2020L0\u3011")
    found = citations(text, pages)
    assert [text[c.start_index:c.end_index] for c in found] == ["\u30101\u2020L2-L4\u3011",
                                                              "\u30101\u2020L0\u3011"]
    assert [(c.url, c.title, c.lines) for c in found] == [(url, "A", (2, 4)), (url, "A", (0, 0))]
    assert citations(text, []) == []


@pytest.mark.slow
def test_responses_carry_url_citations_created_and_streamed(site, tok):
    tools = [{"type": "web_search"}]
    with serving(site, tok) as (api, model):
        response = api.responses.create(model=NAME, input="What is MLX?", tools=tools)
        with api.responses.stream(model=NAME, input="What is MLX?", tools=tools) as stream:
            events = list(stream)
            streamed = stream.get_final_response()
        last_read = tok.decode(model.prefills[-1])
        # the same citation in a response that opened nothing (others did) cites nothing
        unbrowsed = api.responses.create(model=NAME, input="Answer from memory", tools=tools)
    [message] = unbrowsed.output
    assert message.content[0].text == ANSWER and message.content[0].annotations == []
    assert [item.type for item in response.output] == ["web_search_call", "web_search_call", "message"]
    for final in (response, streamed):
        [part] = final.output[-1].content
        assert part.text == ANSWER  # the markers are kept
        [annotation] = part.annotations
        assert annotation.type == "url_citation"
        assert annotation.model_dump(exclude={"type"}) == expected(site)
        assert part.text[annotation.start_index:annotation.end_index] == VALID
    types = [e.type for e in events]
    [added] = [e for e in events if e.type == "response.output_text.annotation.added"]
    assert added.annotation.model_dump() == {"type": "url_citation", **expected(site)}
    assert (added.annotation_index, added.content_index, added.output_index) == (0, 0, 2)
    assert added.item_id == streamed.output[2].id
    text_events = [i for i, t in enumerate(types) if t.startswith("response.output_text.")]
    assert types[text_events[-2]] == "response.output_text.annotation.added"
    assert types[text_events[-1]] == "response.output_text.done"
    assert types.index("response.output_text.delta") < types.index("response.output_text.annotation.added")
    # the model read the page it cites
    assert "<|start|>browser.open to=assistant" in last_read and "[1] Lazy arrays" in last_read


@pytest.mark.slow
def test_chat_completions_carry_url_citations_created_and_streamed(site, tok):
    messages = [{"role": "user", "content": "What is MLX?"}]
    with serving(site, tok) as (api, model):
        plain = api.chat.completions.create(model=NAME, messages=messages)
        completion = api.chat.completions.create(model=NAME, messages=messages, web_search_options={})
        with api.chat.completions.stream(model=NAME, messages=messages, web_search_options={}) as stream:
            chunks = [e.chunk for e in stream if e.type == "chunk"]
            streamed = stream.get_final_completion()
    for final in (completion, streamed):
        message = final.choices[0].message
        assert message.content == ANSWER and final.choices[0].finish_reason == "stop"
        assert message.tool_calls is None  # the browser calls ran on the server
        [annotation] = message.annotations
        assert annotation.type == "url_citation"
        assert annotation.url_citation.model_dump() == expected(site)
    [carrier] = [c for c in chunks if c.choices and getattr(c.choices[0].delta, "annotations", None)]
    assert carrier.choices[0].delta.content is None
    assert completion.usage.completion_tokens == sum(len(harmony(r)) for r in ROUNDS)
    # without web_search_options the browser is neither declared nor run
    assert [("## browser" in tok.decode(p)) for p in model.first_prompts[:2]] == [False, True]
    assert plain.choices[0].finish_reason == "tool_calls" and plain.choices[0].message.annotations is None
