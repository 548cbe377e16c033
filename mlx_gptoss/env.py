"""The environment: our cache directory, the offline switches, and reading JSON that a user
(or a model) handed us, each in one place.

Every JSON file the project reads — config.json, generation_config.json, a safetensors header,
a tools file, a JSON Schema, a conversation, token ids — can be corrupt, not UTF-8, the wrong
shape, or hostile: a hundred thousand nested `[` is valid-looking JSON that makes `json.loads`
raise `RecursionError`, and a few hundred levels that do parse still overflow the recursive code
that walks them afterwards (the TypeScript renderer, the schema compiler, `json.dumps`). So
every reader goes through `parse_json`/`read_json`, which turn all of that into one
`GptOssError` line naming the file, and refuse anything nested deeper than `MAX_JSON_DEPTH`
(far beyond any real config, schema or conversation, far below Python's recursion limit).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import GptOssError

OFFLINE_VARIABLES = ("MLX_GPTOSS_OFFLINE", "HF_HUB_OFFLINE", "TIKTOKEN_OFFLINE")


def user_cache_dir() -> Path:
    """Our own cache directory: `$MLX_GPTOSS_CACHE`, else `$XDG_CACHE_HOME/mlx-gptoss`, else
    `~/.cache/mlx-gptoss` (converted models, the unpacked vocabulary, chat history)."""
    if os.environ.get("MLX_GPTOSS_CACHE"):
        return Path(os.environ["MLX_GPTOSS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-gptoss"


def is_offline() -> bool:
    """Whether the user asked for no network (any of the usual offline variables)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in OFFLINE_VARIABLES)


# Containers inside containers. Real files stay under ~20 (a tool's parameter schema inside a
# developer message inside a conversation); the recursive walkers use a few frames per level,
# and 100 levels keep them well inside Python's default limit of 1000 frames.
MAX_JSON_DEPTH = 100

_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "an integer",
               float: "a number", bool: "true or false"}


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply `value`'s lists and dicts nest (a scalar is 0), counting no further than
    `limit + 1`. Iterative, so it cannot itself overflow the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def check_depth(value: Any, what: str, error: type[GptOssError] = GptOssError,
                limit: int = MAX_JSON_DEPTH) -> Any:
    """`value` unchanged, or `error` when it nests deeper than `limit` (for data that arrives
    already parsed: an API request, a schema dict)."""
    if json_depth(value, limit) > limit:
        raise error(f"{what}: nested more than {limit} levels deep")
    return value


def parse_json(text: str | bytes, what: str, *, expect: type | tuple[type, ...] | None = None,
               error: type[GptOssError] = GptOssError) -> Any:
    """`json.loads(text)`, or one `error` line starting with `what` (e.g. the file's path).

    `expect`: the top-level type(s) required (dict, list...)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{what}: not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, and int() of a huge number
        raise error(f"{what}: not valid JSON ({e})") from None
    check_depth(value, what, error)
    if expect is not None and not _is_a(value, _types(expect)):
        raise error(f"{what}: expected {_describe(expect)}, got {_describe(type(value))}")
    return value


def read_json(path: str | os.PathLike, what: str = "", *,
              expect: type | tuple[type, ...] | None = None,
              error: type[GptOssError] = GptOssError) -> Any:
    """The JSON in file `path`, or one `error` line naming the file (`what`: "tools file",
    "config"... is said after the path)."""
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{label}: not found") from None
    except IsADirectoryError:
        raise error(f"{label}: is a directory, not a file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise error(f"{label}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return parse_json(data, label, expect=expect, error=error)


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that true/false is not an integer unless bool is asked for."""
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _types(expect: type | tuple[type, ...]) -> tuple[type, ...]:
    return expect if isinstance(expect, tuple) else (expect,)


def _describe(expect: type | tuple[type, ...]) -> str:
    names = [_TYPE_NAMES.get(t, "null" if t is type(None) else t.__name__) for t in _types(expect)]
    return " or ".join(names)
