"""The no-key search provider, `ddgs`, through our adapter with a fake `ddgs` module in its
place (the real one queries public search engines; no test touches the internet), and the one
line a user gets when the package is missing."""
from __future__ import annotations

import json
import sys
from types import ModuleType

import pytest
from cli_runner import cli, one_line

from mlx_gptoss.harmony import Author, Message, Role, TextContent
from mlx_gptoss.tools import BrowserTool, ToolError
from mlx_gptoss.tools.search import DdgsSearch, search_provider

RESULTS = [
    {"title": "MLX", "href": "https://ml-explore.github.io/mlx/", "body": "An array\n framework."},
    {"title": "", "href": "https://example.org/untitled", "body": ""},
    {"title": "no link", "body": "dropped: a result without href"},
    {"title": "MLX LM", "href": "https://github.com/ml-explore/mlx-lm", "body": "LLMs."},
]


class FakeDDGS:
    """ddgs 9.x's interface: `DDGS(proxy=None, timeout=5)`, `.text(query, **kwargs)` returning
    dicts with title, href and body, at most `max_results` of them."""

    calls: list[tuple[str, dict]] = []
    failure: Exception | None = None

    def __init__(self, proxy=None, timeout=5):
        pass

    def text(self, query: str, **kwargs) -> list[dict]:
        self.calls.append((query, kwargs))
        if self.failure is not None:
            raise self.failure
        return RESULTS[:kwargs.get("max_results", 10)]


@pytest.fixture
def fake_ddgs(monkeypatch):
    module = ModuleType("ddgs")
    module.DDGS = FakeDDGS
    monkeypatch.setitem(sys.modules, "ddgs", module)
    monkeypatch.setattr(FakeDDGS, "calls", [])
    monkeypatch.setattr(FakeDDGS, "failure", None)
    return FakeDDGS


def search_call(arguments: dict) -> Message:
    return Message(Author(Role.ASSISTANT), [TextContent(json.dumps(arguments))], "analysis",
                   "browser.search", "code")


def test_ddgs_results_become_the_search_page(fake_ddgs):
    provider = search_provider("ddgs")
    assert isinstance(provider, DdgsSearch)
    results = provider.search("mlx", 3)
    assert fake_ddgs.calls == [("mlx", {"max_results": 3})]
    assert [(r.title, r.url, r.snippet) for r in results] == [
        ("MLX", "https://ml-explore.github.io/mlx/", "An array framework."),
        ("https://example.org/untitled", "https://example.org/untitled", "")]
    with BrowserTool(search="ddgs") as tool:
        [reply] = tool.process(search_call({"query": "mlx", "topn": 4}))
        page = reply.text()
        assert page.startswith("[0] mlx\n")
        assert "MLX LM" in page and "An array framework." in page and "no link" not in page
        assert list(tool.stack[0].links.values()) == [
            "https://ml-explore.github.io/mlx/", "https://example.org/untitled",
            "https://github.com/ml-explore/mlx-lm"]


def test_a_ddgs_failure_is_a_reply_the_model_reads(fake_ddgs):
    fake_ddgs.failure = RuntimeError("https://duckduckgo.com/ 202 Ratelimit")
    with BrowserTool(search="ddgs") as tool:
        [reply] = tool.process(search_call({"query": "mlx"}))
    assert reply.text() == "Error during search for `mlx`: search failed: https://duckduckgo.com/ 202 Ratelimit"


def test_without_the_ddgs_package_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ddgs", None)  # import ddgs -> ModuleNotFoundError
    with pytest.raises(ToolError, match=r"needs the ddgs package, which is not installed: pip install ddgs"):
        BrowserTool(search="ddgs")
    # the CLI says so before it loads a model (this one does not exist)
    code, _, err = cli(capsys, "generate", "-m", tmp_path / "nope", "-p", "hi", "--browser",
                       "--browser-search", "ddgs")
    one_line(code, err, "pip install ddgs")
    assert "model directory not found" not in err
