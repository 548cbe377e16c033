"""Search providers for the browser tool: `search(query, topn) -> [SearchResult]`.

- `searxng:URL`: a SearXNG instance's JSON API (`/search?q=...&format=json`; the instance must
  enable the json format in its settings.yml). No key; self-hostable.
- `exa`: the Exa search API (`EXA_API_KEY`, or `api_key=`).
- `ddgs`: the `ddgs` metasearch library (no key; `pip install ddgs`), if installed.

The endpoint a user configures is trusted (it may be on localhost); the pages the model opens
are not (see `web.Fetcher`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

from .base import ToolError
from .web import FetchError, Fetcher

EXA_URL = "https://api.exa.ai"


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str = ""


class SearchProvider(Protocol):
    name: str

    def search(self, query: str, topn: int) -> list[SearchResult]: ...


def _json(response) -> dict:
    if response.status != 200:
        raise FetchError(f"search failed: HTTP {response.status}: {response.text()[:200]}")
    try:
        data = json.loads(response.body)
    except ValueError:
        raise FetchError("search failed: the reply is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise FetchError("search failed: the reply has no 'results' list")
    return data


def _results(items: list, title: str, url: str, snippet: str, topn: int) -> list[SearchResult]:
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get(url), str):
            out.append(SearchResult(str(item.get(title) or item[url]), item[url],
                                    " ".join(str(item.get(snippet) or "").split())))
    return out[:topn]


class SearxngSearch:
    name = "searxng"

    def __init__(self, url: str, fetcher: Fetcher | None = None):
        self.url = url.rstrip("/")
        self.fetcher = fetcher or Fetcher(allow_private=True)

    def search(self, query: str, topn: int) -> list[SearchResult]:
        response = self.fetcher.get(f"{self.url}/search?" + urlencode({"q": query, "format": "json"}),
                                    headers={"Accept": "application/json"})
        return _results(_json(response)["results"], "title", "url", "content", topn)


class ExaSearch:
    name = "exa"

    def __init__(self, api_key: str | None = None, url: str = EXA_URL,
                 fetcher: Fetcher | None = None):
        self.api_key = api_key or os.environ.get("EXA_API_KEY")
        if not self.api_key:
            raise ToolError("Exa search needs an API key: set EXA_API_KEY or pass api_key=")
        self.url = url.rstrip("/")
        self.fetcher = fetcher or Fetcher(allow_private=True)

    def search(self, query: str, topn: int) -> list[SearchResult]:
        payload = {"query": query, "numResults": topn,
                   "contents": {"text": {"maxCharacters": 300}}}
        response = self.fetcher.request(
            "POST", f"{self.url}/search", body=json.dumps(payload).encode(),
            headers={"x-api-key": self.api_key, "Content-Type": "application/json"})
        return _results(_json(response)["results"], "title", "url", "text", topn)


class DdgsSearch:
    """The `ddgs` library's text search (`DDGS().text(query, max_results=N)`: dicts with
    `title`, `href`, `body`; written against ddgs 9.16), which queries public search engines
    itself. It is an optional dependency: without it the provider refuses in one line."""

    name = "ddgs"

    def __init__(self):
        try:
            from ddgs import DDGS
        except ModuleNotFoundError as e:
            if e.name != "ddgs":
                raise ToolError(f"the ddgs package cannot be imported: {e}") from None
            raise ToolError("the ddgs search provider (--browser-search ddgs) needs the ddgs "
                            "package, which is not installed: pip install ddgs") from None
        except ImportError as e:  # installed, but not the DDGS API (another version)
            raise ToolError(f"the ddgs package cannot be imported: {e}") from None
        self._client = DDGS()

    def search(self, query: str, topn: int) -> list[SearchResult]:
        try:
            items = self._client.text(query, max_results=topn)
        except Exception as e:  # the library's own errors: the model reads them
            raise FetchError(f"search failed: {e}") from None
        return _results(list(items or []), "title", "href", "body", topn)


def search_provider(spec: str | SearchProvider | None) -> SearchProvider | None:
    """`exa`, `searxng:URL`, `ddgs`, a provider object, or None (no search)."""
    if spec is None or not isinstance(spec, str):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "searxng":
        if not rest.startswith(("http://", "https://")):
            raise ToolError(f"--browser-search {spec!r}: expected searxng:http(s)://HOST[:PORT]")
        return SearxngSearch(rest)
    if kind == "exa" and not rest:
        return ExaSearch()
    if kind == "ddgs" and not rest:
        return DdgsSearch()
    raise ToolError(f"unknown search provider {spec!r} (expected exa, searxng:URL or ddgs)")
