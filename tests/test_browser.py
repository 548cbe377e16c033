"""The browser tool against a local HTTP server (pages and a SearXNG-format search endpoint):
page rendering, cursors, find, citations, SSRF refusals and limits, and a scripted tool loop."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import local_site

from mlx_gptoss.harmony import Author, Message, Role, SystemContent, TextContent
from mlx_gptoss.tools import BrowserTool, ToolRouter
from mlx_gptoss.tools.browser import cite
from mlx_gptoss.tools.web import FetchError, Fetcher, is_public

ARTICLE = """<!doctype html><html><head><title>MLX &amp; gpt-oss</title>
<style>p {color: red}</style><script>var hidden = "<p>script text</p>";</script></head>
<body><nav><a href="/">Home</a> | <a href="#top">Top</a></nav>
<h1>Apple silicon &amp; MLX</h1>
<p>MLX is an <b>array framework</b> for <a href="https://ml-explore.github.io/mlx/">Apple silicon</a>.</p>
<ul><li>Lazy computation</li><li>Unified memory</li></ul>
<img src="x.png" alt="a chart">
<p>Contact: <a href="mailto:a@b.c">mail</a>. Caf&eacute; &lt;b&gt; 【fake†L1】.</p>
</body></html>"""


class Handler(BaseHTTPRequestHandler):
    release = threading.Event()

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
             headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # an Exa-format search endpoint
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("x-api-key") != "test-key":
            self.send(401, b'{"error": "bad key"}', "application/json")
            return
        results = [{"title": f"exa {i}", "url": f"https://example.com/{i}", "text": "body\n text"}
                   for i in range(payload["numResults"] + 2)]
        self.send(200, json.dumps({"results": results}).encode(), "application/json")

    def do_GET(self):
        url = urlsplit(self.path)
        port = self.server.server_address[1]
        base = f"http://127.0.0.1:{port}"
        if url.path == "/search":
            query = parse_qs(url.query)
            assert query["format"] == ["json"]
            results = [{"title": f"{query['q'][0]} result {i}", "url": f"{base}/article?r={i}",
                        "content": f"snippet {i}"} for i in range(3)]
            self.send(200, json.dumps({"query": query["q"][0], "results": results}).encode(),
                      "application/json")
        elif url.path == "/article":
            self.send(200, ARTICLE.encode())
        elif url.path == "/long":
            lines = "".join(f"<p>line {i}</p>" for i in range(200))
            self.send(200, f"<html><title>Long</title><body>{lines}</body></html>".encode())
        elif url.path == "/to-other-loopback":
            self.send(302, b"", headers={"Location": f"http://127.0.0.2:{port}/article"})
        elif url.path == "/to-article":
            self.send(301, b"", headers={"Location": "/article"})
        elif url.path == "/loop":
            self.send(302, b"", headers={"Location": "/loop"})
        elif url.path == "/big":
            self.send(200, b"<p>" + b"x" * 200_000 + b"</p>")
        elif url.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"<p>start")
            self.wfile.flush()
            self.release.wait(30)
        elif url.path == "/latin1":
            self.send(200, "<meta charset='iso-8859-1'><p>Café</p>".encode("latin-1"), "text/html")
        elif url.path == "/gzip-bomb":
            import gzip
            self.send(200, gzip.compress(b"<p>" + b"x" * 10_000_000), headers={"Content-Encoding": "gzip"})
        elif url.path == "/gzip":
            import gzip
            self.send(200, gzip.compress(b"<p>zipped</p>"), headers={"Content-Encoding": "gzip"})
        elif url.path == "/image":
            self.send(200, b"\x89PNG....", "image/png")
        else:
            self.send(404, b"<p>not found</p>")


@pytest.fixture(scope="module")
def server():
    with local_site(Handler) as url:
        yield url
        Handler.release.set()  # a request held by the test must not block the shutdown


def call(function: str, arguments: dict | str) -> Message:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return Message(Author(Role.ASSISTANT), [TextContent(text)], "analysis", f"browser.{function}",
                   "code")


def browser(server: str) -> BrowserTool:
    return BrowserTool(search=f"searxng:{server}", allow_private=True)


def reply_text(tool, function, arguments) -> str:
    [reply] = tool.process(call(function, arguments))
    assert reply.author.role is Role.TOOL and reply.author.name == f"browser.{function}"
    assert reply.recipient == "assistant" and reply.channel == "analysis"
    return reply.text()


def test_open_renders_the_reference_page_layout(server):
    with browser(server) as tool:
        text = reply_text(tool, "open", {"id": f"{server}/article"})
    assert text == "\n".join([
        f"[0] MLX & gpt-oss ({server}/article)",
        "**viewing lines [0 - 12] of 12**",
        "",
        "L0: ",
        f"L1: URL: {server}/article",
        "L2: \u30100\u2020Home\u3011 | Top",
        "L3: ",
        "L4: Apple silicon & MLX",
        "L5: ",
        "L6: MLX is an array framework for \u30101\u2020Apple silicon\u2020ml-explore.github.io\u3011.",
        "L7: ",
        "L8:   * Lazy computation",
        "L9:   * Unified memory",
        "L10: [Image 0: a chart]",
        "L11: ",
        "L12: Contact: mail. Café <b> \u3016fake\u2020L1\u3017.",
    ])


def test_search_then_open_a_result_then_find_walks_the_cursor_stack(server):
    with browser(server) as tool:
        results = reply_text(tool, "search", {"query": "mlx", "topn": 2})
        assert results == "\n".join([
            "[0] mlx", "**viewing lines [0 - 3] of 3**", "", "L0: Search Results", "L1: ",
            "L2:   * \u30100\u2020mlx result 0\u2020127.0.0.1\u3011 snippet 0",
            "L3:   * \u30101\u2020mlx result 1\u2020127.0.0.1\u3011 snippet 1"])  # topn=2 of 3
        page = reply_text(tool, "open", {"id": 1})
        assert page.startswith(f"[1] MLX & gpt-oss ({server}/article?r=1)\n")
        found = reply_text(tool, "find", {"pattern": "APPLE"})
        assert found == "\n".join([
            f"[2] Find results for text: `APPLE` in `MLX & gpt-oss` "
            f"({server}/article?r=1/find?pattern=APPLE)",
            "**viewing lines [0 - 4] of 4**", "",
            "L0: # \u30100\u2020match at L4\u3011", "L1: Apple silicon & MLX", "L2: ",
            "L3: MLX is an array framework for Apple silicon.", "L4: "])  # links stripped
        # Scroll the search page (cursor 0) without fetching: a new cursor, the same page.
        scrolled = reply_text(tool, "open", {"cursor": 0, "loc": 3, "num_lines": 1})
        assert scrolled.splitlines() == ["[3] mlx", "**viewing lines [3 - 3] of 3**", "",
                                         "L3:   * \u30101\u2020mlx result 1\u2020127.0.0.1\u3011 snippet 1"]
        assert [p.url for p in tool.stack] == ["", f"{server}/article?r=1",
                                               f"{server}/article?r=1/find?pattern=APPLE", ""]


def test_long_pages_show_one_view_and_scroll(server):
    with BrowserTool(allow_private=True, view_chars=300) as tool:
        first = reply_text(tool, "open", {"id": f"{server}/long"})
        assert "**viewing lines [0 - 23] of 400**" in first  # 24 short lines fit in 300 chars
        view = reply_text(tool, "open", {"loc": 390, "num_lines": 20})
        assert "**viewing lines [390 - 400] of 400**" in view and view.endswith("L400: line 199")
        assert reply_text(tool, "open", {"loc": 401}) == (
            "Invalid location parameter: `401`. Cannot exceed page maximum of 400.")


@pytest.mark.parametrize("function, arguments, expected", [
    ("open", {"cursor": 5}, "No pages to access!"),
    ("find", {"pattern": "x"}, "No pages to access!"),
    ("open", "{not json", "arguments are not valid JSON"),
    ("open", "[1]", "arguments must be a JSON object"),
    ("open", {"id": 1, "bogus": 2}, "bad arguments for browser.open"),
    ("open", {"loc": "ten"}, "`loc` must be an integer"),
    ("search", {"query": ""}, "`query` must be a non-empty string"),
    ("scroll", {}, "unknown browser function 'scroll'"),
])
def test_bad_calls_become_replies(server, function, arguments, expected):
    with browser(server) as tool:
        assert expected in reply_text(tool, function, arguments)


def test_link_ids_and_cursors_are_checked(server):
    with browser(server) as tool:
        reply_text(tool, "open", {"id": f"{server}/article"})
        assert reply_text(tool, "open", {"id": 7}) == "Invalid link id `7`."
        assert reply_text(tool, "open", {"cursor": 3, "id": 0}) == (
            "Cursor `3` is out of range. Available cursor indices: [0 - 0].")


def test_without_a_search_provider_search_says_so():
    with BrowserTool() as tool:
        assert "no search provider is configured" in reply_text(tool, "search", {"query": "x"})


def test_citations_become_url_annotations(server):
    with browser(server) as tool:
        reply_text(tool, "search", {"query": "mlx"})
        reply_text(tool, "open", {"id": 0})
        text, citations = tool.cite("MLX is lazy \u30101\u2020L8-L9\u3011 and fast \u30100\u2020L2\u3011"
                                    " \u30109\u2020L1\u3011.")
    link = f"([127.0.0.1]({server}/article?r=0))"
    assert text == f"MLX is lazy {link} and fast \u30100\u2020L2\u3011 \u30109\u2020L1\u3011."
    [citation] = citations  # cursor 0 is the search page (no URL), 9 was never opened
    assert text[citation.start_index:citation.end_index] == link
    assert citation.to_dict() == {"type": "url_citation", "start_index": 12,
                                  "end_index": 12 + len(link), "url": f"{server}/article?r=0",
                                  "title": "MLX & gpt-oss"}
    assert citation.lines == (8, 9)
    assert cite("no citations", []) == ("no citations", [])


# --------------------------------------------------------------------------- SSRF and limits


@pytest.mark.parametrize("path", ["http://127.0.0.1:{port}/article", "http://localhost:{port}/article",
                                  "http://2130706433:{port}/article", "http://[::ffff:127.0.0.1]:{port}/",
                                  "http://0.0.0.0:{port}/"])
def test_loopback_is_refused_unless_allowed(server, path):
    port = urlsplit(server).port
    with BrowserTool() as tool:
        text = reply_text(tool, "open", {"id": path.format(port=port)})
    assert "refused:" in text and "non-public address" in text


@pytest.mark.parametrize("address, public", [
    ("10.0.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("fd00::1", False), ("::1", False), ("::ffff:10.0.0.1", False), ("224.0.0.1", False),
    ("8.8.8.8", True), ("2606:4700::1111", True)])
def test_private_link_local_and_metadata_addresses_are_not_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/", "gopher://x/",
                                 "/etc/passwd", "http:///nohost"])
def test_only_http_and_https_urls(url):
    with pytest.raises(FetchError, match="only http and https|no host"):
        Fetcher(allow_private=True).get(url)


def test_every_redirect_hop_is_checked(server):
    only_127_0_0_1 = Fetcher(allowed_networks=("127.0.0.1/32",))
    assert only_127_0_0_1.get(f"{server}/to-article").url == f"{server}/article"
    with pytest.raises(FetchError, match="127.0.0.2"):
        only_127_0_0_1.get(f"{server}/to-other-loopback")
    with pytest.raises(FetchError, match="too many redirects"):
        Fetcher(allow_private=True, max_redirects=3).get(f"{server}/loop")


@pytest.mark.slow
def test_size_timeout_and_content_type_limits(server):
    with pytest.raises(FetchError, match="larger than 100000 bytes"):
        Fetcher(allow_private=True, max_bytes=100_000).get(f"{server}/big")
    with pytest.raises(FetchError, match="timed out"):
        Fetcher(allow_private=True, timeout=0.5).get(f"{server}/stall")
    with BrowserTool(allow_private=True) as tool:
        assert "cannot show image/png content" in reply_text(tool, "open", {"id": f"{server}/image"})


# --------------------------------------------------------------------------- tool loop


# A model that searches, opens the first result, and answers citing it.
BROWSING_ROUNDS = [
    '<|channel|>analysis to=browser.search <|constrain|>json<|message|>'
    '{"query": "mlx", "topn": 3}<|call|>',
    '<|channel|>analysis to=browser.open code<|message|>{"id": 1}<|call|>',
    "<|channel|>final<|message|>MLX is lazy \u30101\u2020L8\u3011.<|return|>",
]


@pytest.mark.slow
def test_scripted_model_searches_then_opens_through_the_router(server):
    from scripted import ScriptedModel, harmony

    from mlx_gptoss.generate import generate
    from mlx_gptoss.harmony import load_tokenizer

    model = ScriptedModel([harmony(r) for r in BROWSING_ROUNDS])
    tokenizer = load_tokenizer()
    with ToolRouter([browser(server)]) as router:
        system = SystemContent()
        router.apply(system)
        conversation = [Message.from_role_and_content(Role.SYSTEM, system),
                        Message.from_role_and_content(Role.USER, "What is MLX?")]
        for _ in range(3):
            result = generate(model, tokenizer, conversation, max_tokens=200)
            conversation += result.messages
            if result.stop != "call":
                break
            conversation += router.process(result.messages[-1])
        tool_replies = [m for m in conversation if m.author.role is Role.TOOL]
        assert [m.author.name for m in tool_replies] == ["browser.search", "browser.open"]
        assert tool_replies[0].text().startswith("[0] mlx\n")
        assert tool_replies[1].text().startswith(f"[1] MLX & gpt-oss ({server}/article?r=1)\n")
        # The model read the browser namespace first and the opened page last.
        assert "## browser\n\n// Tool for browsing." in tokenizer.decode(model.prefills[0])
        assert "[1] MLX & gpt-oss" in tokenizer.decode(model.prefills[-1])
        text, [citation] = router["browser"].cite(result.text)
        assert text == f"MLX is lazy ([127.0.0.1]({server}/article?r=1))."


@pytest.mark.slow
def test_chat_runs_the_browser_loop_search_then_open(server):
    """The same three rounds through `Chat` (the agent loop): the browser is declared in the
    system message, both calls run in one turn, the answer cites the opened page."""
    from scripted import ScriptedModel, harmony

    from mlx_gptoss.chat import Chat
    from mlx_gptoss.harmony import load_tokenizer
    from mlx_gptoss.sampling import SamplingParams

    model = ScriptedModel([harmony(r) for r in BROWSING_ROUNDS])
    tokenizer = load_tokenizer()
    with Chat(model, tokenizer, browser=browser(server),
              sampling=SamplingParams(temperature=0)) as chat:
        reply = chat.send("What is MLX?")
        assert reply.stop == "return" and reply.text.startswith("MLX is lazy")
        tools = [m.author.name for m in reply.messages if m.author.role is Role.TOOL]
        assert tools == ["browser.search", "browser.open"]
        assert "## browser\n\n// Tool for browsing." in tokenizer.decode(model.prefills[0])
        text, _ = chat.browser.cite(reply.text)
        assert text == f"MLX is lazy ([127.0.0.1]({server}/article?r=1))."


def test_exa_and_provider_specs(server):
    from mlx_gptoss.tools.search import ExaSearch, SearxngSearch, search_provider
    from mlx_gptoss.tools.base import ToolError

    results = ExaSearch(api_key="test-key", url=server).search("q", 2)
    assert [(r.title, r.url, r.snippet) for r in results] == [
        ("exa 0", "https://example.com/0", "body text"), ("exa 1", "https://example.com/1", "body text")]
    with pytest.raises(FetchError, match="HTTP 401"):
        ExaSearch(api_key="wrong", url=server).search("q", 2)
    assert isinstance(search_provider(f"searxng:{server}"), SearxngSearch)
    for bad in ("bing", "searxng:ftp://x", "exa:extra"):
        with pytest.raises(ToolError, match="expected"):
            search_provider(bad)


@pytest.mark.slow
def test_charset_from_meta_and_bounded_gzip(server):
    fetcher = Fetcher(allow_private=True, max_bytes=1_000_000)
    assert "Café" in fetcher.get(f"{server}/latin1").text()
    assert fetcher.get(f"{server}/gzip").body == b"<p>zipped</p>"
    with pytest.raises(FetchError, match="larger than 1000000 bytes"):
        fetcher.get(f"{server}/gzip-bomb")
