"""OpenAI's error body and the small readers that validate request JSON field by field.

Every problem with a request is an `APIError`: an HTTP status plus OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`), so clients such as the openai SDK raise
their usual typed exceptions. The readers name the offending field (`param`, e.g.
`input[2].content`), which is what a user needs to fix a request.
"""
from __future__ import annotations

from typing import Any

from ..errors import GptOssError

_MISSING = object()


class APIError(GptOssError):
    """A request the server refuses: `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_KINDS: dict[str, tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "object": (dict,), "array": (list,),
    "integer": (int,), "number": (int, float),
}


def get(obj: dict, key: str, kind: str, param: str, default: Any = None, *,
        required: bool = False, nullable: bool = True) -> Any:
    """`obj[key]` checked to be of JSON type `kind` ("string", "number", ...); `default` when
    absent (or null, when `nullable`)."""
    value = obj.get(key, _MISSING)
    where = f"{param}.{key}" if param else key
    if value is _MISSING or (value is None and nullable):
        if required:
            raise bad_request(f"missing required parameter '{where}'", where, "missing_required_parameter")
        return default
    types = _KINDS[kind]
    ok = isinstance(value, types) and not (kind in ("integer", "number") and isinstance(value, bool))
    if not ok:
        raise bad_request(f"invalid type for '{where}': expected {_article(kind)}, "
                          f"got {_json_type(value)}", where, "invalid_type")
    return value


def get_number(obj: dict, key: str, param: str, lo: float, hi: float) -> float | None:
    value = get(obj, key, "number", param)
    if value is not None and not lo <= value <= hi:
        where = f"{param}.{key}" if param else key
        raise bad_request(f"'{where}' must be between {lo} and {hi}, got {value}", where, "invalid_value")
    return value


def get_positive_int(obj: dict, key: str, param: str) -> int | None:
    value = get(obj, key, "integer", param)
    if value is not None and value < 1:
        where = f"{param}.{key}" if param else key
        raise bad_request(f"'{where}' must be at least 1, got {value}", where, "invalid_value")
    return value


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, types in _KINDS.items():
        if isinstance(value, types) and not isinstance(value, bool) or (kind == "boolean" and isinstance(value, bool)):
            return kind
    return type(value).__name__
