"""The built-in `browser` tool, as gpt-oss was trained to use it: `browser.search`,
`browser.open`, `browser.find`.

Every page the tool shows is pushed on a stack; its index is the page's *cursor*. The reply
looks like the reference's browsing display:

    [3] Page title (https://example.com/page)
    **viewing lines [0 - 41] of 120**

    L0:
    L1: URL: https://example.com/page
    L2: text with a link 【0†link text】 ...

Lines are the page text wrapped at 80 columns; a view shows up to `view_chars` characters of
numbered lines (about 1000 tokens, the reference's view) unless `num_lines` is given. The model
cites `【cursor†Lx-Ly】`; `citations(text)` finds the markers that cite a page really opened
(the server's `url_citation` annotations span them), `cite(text)` turns them into links. Search results are a page too, each result a numbered link. Anything that goes
wrong (bad arguments, a refused or failed fetch) is a reply the model reads.
"""
from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

from ..harmony import Message, ToolDescription, ToolNamespaceConfig
from .base import Tool
from .search import SearchProvider, search_provider
from .web import FetchError, Fetcher, Page, html_to_page, page_from_response

DEFAULT_VIEW_CHARS = 4000
FIND_CONTEXT_LINES = 4
MAX_FIND_RESULTS = 50
CITATION = re.compile("\u3010(\\d+)\u2020L(\\d+)(?:-L(\\d+))?\u3011")

_BROWSER_DESCRIPTION = "\n".join([
    "Tool for browsing.",
    "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.",
    "Cite information from the tool using the following format:",
    "`\u3010{cursor}\u2020L{line_start}(-L{line_end})?\u3011`, for example: "
    "`\u30106\u2020L9-L11\u3011` or `\u30108\u2020L3\u3011`.",
    "Do not quote more than 10 words directly from the tool output.",
    "sources=web (default: web)",
])

_BROWSER_OPEN_DESCRIPTION = "\n".join([
    "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
    "showing `num_lines` lines.",
    "Valid link ids are displayed with the formatting: `\u3010{id}\u2020.*\u3011`.",
    "If `cursor` is not provided, the most recent page is implied.",
    "If `id` is a string, it is treated as a fully qualified URL associated with `source`.",
    "If `loc` is not provided, the viewport will be positioned at the beginning of the document "
    "or centered on the most relevant passage, if available.",
    "Use this function without `id` to scroll to a new location of an opened page.",
])

def _object(properties: dict, required: list[str] | None = None) -> dict:
    schema: dict = {"type": "object", "properties": properties}
    if required is not None:
        schema["required"] = required
    return schema


def browser_namespace() -> ToolNamespaceConfig:
    number_default = {"type": "number", "default": -1}
    return ToolNamespaceConfig("browser", [
        ToolDescription(
            "search",
            "Searches for information related to `query` and displays `topn` results.",
            _object({"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                     "source": {"type": "string"}}, ["query"]),
        ),
        ToolDescription("open", _BROWSER_OPEN_DESCRIPTION, _object({
            "id": {"type": ["number", "string"], "default": -1},
            "cursor": dict(number_default),
            "loc": dict(number_default),
            "num_lines": dict(number_default),
            "view_source": {"type": "boolean", "default": False},
            "source": {"type": "string"},
        })),
        ToolDescription(
            "find",
            "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
            _object({"pattern": {"type": "string"}, "cursor": dict(number_default)}, ["pattern"]),
        ),
    ], _BROWSER_DESCRIPTION)


# --------------------------------------------------------------------------- the tool


class BrowserError(Exception):
    """A bad call (wrong cursor, link id, location): its text is the tool's reply."""


@dataclass
class Citation:
    """A `【cursor†Lx-Ly】` resolved: where its replacement is in the new text, and the page."""

    start_index: int
    end_index: int
    url: str
    title: str
    lines: tuple[int, int]

    def to_dict(self) -> dict:
        """OpenAI's `url_citation` annotation."""
        return {"type": "url_citation", "start_index": self.start_index,
                "end_index": self.end_index, "url": self.url, "title": self.title}


class BrowserTool(Tool):
    """`BrowserTool(search="searxng:http://127.0.0.1:8888")`: search, open and find pages.

    `search`: "exa", "searxng:URL", "ddgs", a `SearchProvider`, or None (open URLs only).
    `allow_private`: let the model open private and loopback addresses (off: SSRF).
    """

    name = "browser"

    def __init__(self, search: str | SearchProvider | None = None, *,
                 allow_private: bool = False, fetcher: Fetcher | None = None,
                 view_chars: int = DEFAULT_VIEW_CHARS):
        self.search_provider = search_provider(search)
        self.fetcher = fetcher or Fetcher(allow_private=allow_private)
        self.view_chars = view_chars
        self.stack: list[Page] = []

    def namespace_config(self) -> ToolNamespaceConfig:
        return browser_namespace()

    def close(self) -> None:
        self.stack.clear()

    # ----------------------------------------------------------------- dispatch

    def process(self, message: Message) -> list[Message]:
        function = (message.recipient or "").partition(".")[2]
        handlers = {"search": self.search, "open": self.open, "find": self.find}
        if function not in handlers:
            return [self.error(message, f"unknown browser function {function!r}; "
                                        "use browser.search, browser.open or browser.find")]
        text = message.text().strip()
        try:
            arguments = json.loads(text) if text else {}
        except ValueError as e:
            return [self.error(message, f"arguments are not valid JSON ({e}); send a JSON object")]
        if not isinstance(arguments, dict):
            return [self.error(message, "arguments must be a JSON object")]
        try:
            return [self.reply(message, handlers[function](**arguments))]
        except TypeError as e:
            return [self.error(message, f"bad arguments for browser.{function}: {e}")]
        except (BrowserError, FetchError) as e:
            return [self.reply(message, str(e))]

    # ----------------------------------------------------------------- functions

    def search(self, query: str, topn: int = 10, source: str | None = None) -> str:
        if self.search_provider is None:
            raise BrowserError("search is not available (no search provider is configured); "
                               "open a URL with browser.open instead")
        if not isinstance(query, str) or not query.strip():
            raise BrowserError("`query` must be a non-empty string")
        topn = _integer(topn, "topn", minimum=1)
        try:
            results = self.search_provider.search(query, min(topn, 50))
        except FetchError as e:
            raise BrowserError(f"Error during search for `{query}`: {e}") from None
        items = "".join(f"<li><a href=\"{_attr(r.url)}\">{_text(r.title)}</a> {_text(r.snippet)}</li>"
                        for r in results)
        page = html_to_page(f"<html><body><h1>Search Results</h1><ul>{items}</ul></body></html>",
                            "", title=query)
        page.text = page.text.removeprefix("\nURL: \n")
        return self._push_and_show(page, 0, -1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        loc = _integer(loc, "loc", minimum=-1)
        num_lines = _integer(num_lines, "num_lines", minimum=-1)
        if isinstance(id, str):
            page = self._fetch(id, view_source)
        else:
            current = self._page(cursor)
            link = _integer(id, "id", minimum=-1)
            if link < 0 and not view_source:
                page = current  # scroll the page
            else:
                url = current.url if link < 0 else current.links.get(link)
                if url is None:
                    raise BrowserError(f"Invalid link id `{link}`.")
                page = self._fetch(url, view_source)
        return self._push_and_show(page, max(loc, 0), num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        if not isinstance(pattern, str) or not pattern:
            raise BrowserError("`pattern` must be a non-empty string")
        page = self._page(cursor)
        lines = [_strip_links(line) for line in wrap(page.text)]
        wanted = pattern.lower()
        chunks, i = [], 0
        while i < len(lines) and len(chunks) < MAX_FIND_RESULTS:
            if wanted in lines[i].lower():
                body = "\n".join(lines[i:i + FIND_CONTEXT_LINES])
                chunks.append(f"# \u3010{len(chunks)}\u2020match at L{i}\u3011\n{body}")
                i += FIND_CONTEXT_LINES
            else:
                i += 1
        text = "\n\n".join(chunks) or f"No `find` results for pattern: `{pattern}`"
        found = Page(f"{page.url}/find?pattern={quote(pattern)}",
                     f"Find results for text: `{pattern}` in `{page.title}`", text,
                     {k: page.url for k in range(len(chunks))})
        return self._push_and_show(found, 0, -1)

    # ----------------------------------------------------------------- pages

    def _fetch(self, url: str, view_source: bool) -> Page:
        try:
            return page_from_response(self.fetcher.get(url), view_source)
        except FetchError as e:
            raise BrowserError(f"Error fetching URL `{url[:1000]}`: {e}") from None

    def _page(self, cursor) -> Page:
        cursor = _integer(cursor, "cursor", minimum=-1)
        if not self.stack:
            raise BrowserError("No pages to access!")
        if cursor >= len(self.stack):
            raise BrowserError(f"Cursor `{cursor}` is out of range. "
                               f"Available cursor indices: [0 - {len(self.stack) - 1}].")
        return self.stack[cursor]

    def _push_and_show(self, page: Page, loc: int, num_lines: int) -> str:
        lines = wrap(page.text)
        if loc >= len(lines):
            raise BrowserError(f"Invalid location parameter: `{loc}`. "
                               f"Cannot exceed page maximum of {len(lines) - 1}.")
        end = self._view_end(lines, loc, num_lines)
        self.stack.append(page)
        header = page.title + (f" ({unquote(page.url)[:1000]})" if page.url else "")
        body = "\n".join(f"L{n}: {lines[n]}" for n in range(loc, end))
        return (f"[{len(self.stack) - 1}] {header}\n"
                f"**viewing lines [{loc} - {end - 1}] of {len(lines) - 1}**\n\n{body}")

    def _view_end(self, lines: list[str], loc: int, num_lines: int) -> int:
        if num_lines > 0:
            return min(loc + num_lines, len(lines))
        size, end = 0, loc
        while end < len(lines) and (end == loc or size + len(lines[end]) + 8 <= self.view_chars):
            size += len(lines[end]) + 8  # "L123: " and the newline
            end += 1
        return end

    # ----------------------------------------------------------------- citations

    def citations(self, text: str) -> list[Citation]:
        """The `【cursor†Lx-Ly】` markers of `text` that point at lines of a page this tool
        opened, spans of `text` itself (see `citations`)."""
        return citations(text, self.stack)

    def cite(self, text: str) -> tuple[str, list[Citation]]:
        """`text` with each `【cursor†Lx-Ly】` of an open page replaced by `([domain](url))`,
        and the citations; unknown cursors stay as they are."""
        return cite(text, self.stack)


def citations(text: str, pages: list[Page]) -> list[Citation]:
    """Each `【cursor†Lx-Ly】` in `text` that cites lines of a page in `pages` (the tool's cursor
    stack), spanning the marker itself: the text is left unchanged, as the server's
    `url_citation` annotations need. The model's output is not trusted: a cursor never opened,
    a page without a URL (search results), a range past the page's last line or reversed is no
    citation, and its marker stays plain text."""
    out = []
    line_counts: dict[int, int] = {}
    for match in CITATION.finditer(text):
        cursor, first = int(match.group(1)), int(match.group(2))
        last = int(match.group(3) or first)
        page = pages[cursor] if cursor < len(pages) else None
        if page is None or not page.url.startswith(("http://", "https://")):
            continue
        if cursor not in line_counts:
            line_counts[cursor] = len(wrap(page.text))
        if not first <= last < line_counts[cursor]:
            continue
        out.append(Citation(match.start(), match.end(), page.url, page.title, (first, last)))
    return out


def cite(text: str, pages: list[Page]) -> tuple[str, list[Citation]]:
    """`text` with each valid citation (see `citations`) replaced by a `([domain](url))` link,
    and the citations, re-indexed to span the links (for plain-text front ends: the CLI)."""
    out, linked, last, shift = [], [], 0, 0
    for found in citations(text, pages):
        domain = urlsplit(found.url).hostname or found.url
        link = f"([{domain}]({found.url}))"
        out += [text[last:found.start_index], link]
        start = found.start_index + shift
        linked.append(replace(found, start_index=start, end_index=start + len(link)))
        shift += len(link) - (found.end_index - found.start_index)
        last = found.end_index
    out.append(text[last:])
    return "".join(out), linked


def wrap(text: str, width: int = 80) -> list[str]:
    """The page's lines: each text line wrapped at `width`, empty lines kept."""
    lines: list[str] = []
    for line in text.split("\n"):
        lines.extend(textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False)
                     if line else [""])
    return lines


def _strip_links(line: str) -> str:
    """`【3†text†domain】` → `text`, so `find` matches what the reader sees."""
    return re.sub("\u3010\\d+\u2020([^\u2020\u3011]*)(?:\u2020[^\u3011]*)?\u3011", r"\1", line)


def _integer(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BrowserError(f"`{name}` must be an integer, not {json.dumps(value)[:40]}")
    if value < minimum:
        raise BrowserError(f"`{name}` must be at least {minimum}")
    return int(value)


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attr(value: str) -> str:
    return _text(value).replace('"', "&quot;")
