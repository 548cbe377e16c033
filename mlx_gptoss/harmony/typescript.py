"""JSON Schema → the TypeScript-like types gpt-oss reads in a `# Tools` section.

The model was trained on openai-harmony's rendering, quirks included, so this follows it rule
for rule rather than TypeScript: `integer` is `number`, arrays are `T[]` even for unions,
`anyOf`/`allOf`/`$ref` become `any`, `// default:` comments quote strings only outside enums,
descriptions are printed as given (newlines and all), object members are not indented at the
top level, nested ones by four spaces and `oneOf` variants by three.
"""
from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from ..env import check_depth
from ..errors import HarmonyError


def _get(schema: Any, key: str) -> Any:
    """`schema[key]` when schema is an object (serde's `Value::get`), else None."""
    return schema.get(key) if isinstance(schema, dict) else None


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_true(value: Any) -> bool:
    return value is True


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _format_float(x: float) -> str:
    """A float the way serde_json (ryu) prints it: shortest digits, `1e16`, `1e-7`, `100.0`."""
    if not math.isfinite(x):
        return "null"
    sign = "-" if math.copysign(1.0, x) < 0 else ""
    if x == 0:
        return sign + "0.0"
    _, digits, exponent = Decimal(repr(abs(x))).normalize().as_tuple()
    d = "".join(map(str, digits))
    length, kk = len(d), len(d) + exponent
    if 0 <= exponent and kk <= 16:
        body = d + "0" * exponent + ".0"
    elif 0 < kk <= 16:
        body = d[:kk] + "." + d[kk:]
    elif -5 < kk <= 0:
        body = "0." + "0" * (-kk) + d
    elif length == 1:
        body = f"{d}e{kk - 1}"
    else:
        body = f"{d[0]}.{d[1:]}e{kk - 1}"
    return sign + body


def json_display(value: Any) -> str:
    """Compact JSON as serde_json's `Display` writes it (floats included)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, list):
        return "[" + ",".join(json_display(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json_display(str(k))}:{json_display(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _default_comment(schema: Any, default: Any) -> str:
    """`default: "x"` for plain strings, `default: x` for enum strings, JSON otherwise."""
    if _is_str(default):
        return f'default: "{default}"' if not _is_enum(schema) else f"default: {default}"
    return f"default: {json_display(default)}"


def _with_null(variant: Any, type_str: str) -> str:
    if _is_true(_get(variant, "nullable")) and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _variant_comments(variant: Any, skip_description: bool, property_desc: str | None) -> str:
    comments = []
    desc = _get(variant, "description")
    if not skip_description and _is_str(desc) and desc != property_desc:
        comments.append(desc)
    if "default" in (variant if isinstance(variant, dict) else {}):
        comments.append(_default_comment(variant, variant["default"]))
    return f" // {' '.join(comments)}" if comments else ""


def _one_of(variants: list, indent: str) -> str:
    out = []
    for variant in variants:
        out.append(f"\n{indent} | ")
        out.append(_with_null(variant, _type(variant, indent + "   ")))
        out.append(_variant_comments(variant, False, None))
    return "".join(out)


def _property(key: str, val: Any, required: set[str], indent: str) -> str:
    out = []
    title = _get(val, "title")
    if _is_str(title):
        out.append(f"{indent}// {title}\n{indent}//\n")
    one_of = _get(val, "oneOf")
    desc = _get(val, "description")
    if one_of is None and _is_str(desc):
        out.append(f"{indent}// {desc}\n")
    examples = _get(val, "examples")
    if isinstance(examples, list) and examples:
        out.append(f"{indent}// Examples:\n")
        out.extend(f'{indent}// - "{ex}"\n' for ex in examples if _is_str(ex))
    mark = "" if key in required else "?"
    if isinstance(one_of, list):
        property_desc = desc if _is_str(desc) else None
        first_desc = _get(one_of[0], "description") if one_of else None
        desc_above = property_desc is not None and property_desc != first_desc
        if desc_above:
            out.append(f"{indent}// {property_desc}\n")
        if "default" in val:
            out.append(f"{indent}// {_default_comment(val, val['default'])}\n")
        out.append(f"{indent}{key}{mark}:\n")
        for i, variant in enumerate(one_of):
            out.append(f"{indent} | ")
            out.append(_with_null(variant, _type(variant, indent + "   ")))
            out.append(_variant_comments(variant, i == 0 and desc_above, property_desc))
            out.append("\n")
        out.append(f"{indent},\n")
        return "".join(out)
    out.append(f"{indent}{key}{mark}: ")
    out.append(_with_null(val, _type(val, indent + "    ")))
    out.append(",")
    if one_of is None and isinstance(val, dict) and "default" in val:
        out.append(f" // {_default_comment(val, val['default'])}")
    out.append("\n")
    return "".join(out)


def _object_type(schema: dict, indent: str) -> str:
    out = []
    desc = schema.get("description")
    if _is_str(desc):
        out.append(f"{indent}// {desc}\n")
    out.append("{\n")
    props = schema.get("properties")
    if isinstance(props, dict):
        req = schema.get("required")
        required = {r for r in req if _is_str(r)} if isinstance(req, list) else set()
        out.extend(_property(key, val, required, indent) for key, val in props.items())
    out.append(f"{indent}}}")
    return "".join(out)


def _named_type(schema: dict, ty: str, indent: str) -> str:
    if ty == "object":
        return _object_type(schema, indent)
    if ty == "string":
        values = schema.get("enum")
        names = [f'"{v}"' for v in values if _is_str(v)] if isinstance(values, list) else []
        return " | ".join(names) if names else "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        return f"{_type(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """Render one JSON Schema as harmony's TypeScript-like type, starting at `indent`.

    The rendering recurses per level, so a schema nested deeper than `MAX_JSON_DEPTH` (from an
    API request, say) is refused with a `HarmonyError` instead of overflowing the stack."""
    check_depth(schema, "a tool's parameter schema", HarmonyError)
    return _type(schema, indent)


def _type(schema: Any, indent: str) -> str:
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        return _one_of(one_of, indent)
    ty = _get(schema, "type")
    if isinstance(ty, list):
        names = ["number" if t == "integer" else t for t in ty if _is_str(t)]
        if names:
            return " | ".join(names)
    if _is_str(ty):
        return _named_type(schema, ty, indent)
    return "any"
