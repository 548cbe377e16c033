"""Function-tool schemas from hints and docstrings, tools files, and the python sandbox."""
from __future__ import annotations

import enum
import json
import os
from typing import Literal, Optional

import jsonschema
import pytest

from mlx_gptoss.errors import GptOssError
from mlx_gptoss.tools.functions import (
    FunctionTool,
    ToolRegistry,
    ToolsFileError,
    function_tool,
    load_tools_file,
)
from mlx_gptoss.tools.python import PythonTool


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def get_weather(location: str, unit: Unit = Unit.C, days: Optional[int] = None,
                hours: list[int] | None = None, detailed: bool = False,
                mode: Literal["fast", "slow"] = "fast", extra: dict = {}) -> dict:
    """Get the weather for a place.

    Uses the best source available.

    Args:
        location: The city, e.g. Paris.
        unit: Temperature unit,
            celsius by default.
        days: How many days ahead.

    Returns:
        A dict.
    """
    return {"location": location, "unit": Unit(unit).value, "days": days}


def sphinx_style(query: str, limit: float = 2.5):
    """Search things.

    :param query: What to look for.
    :param limit: Upper bound.
    """
    return [query, limit]


def test_schema_from_hints_and_google_docstring():
    tool = function_tool(get_weather)
    assert tool.name == "get_weather"
    assert tool.description == "Get the weather for a place.\n\nUses the best source available."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city, e.g. Paris."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                     "description": "Temperature unit, celsius by default.", "default": "celsius"},
            "days": {"type": "integer", "description": "How many days ahead."},
            "hours": {"type": "array", "items": {"type": "integer"}},
            "detailed": {"type": "boolean", "default": False},
            "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
            "extra": {"type": "object", "default": {}},
        },
        "required": ["location"],
    }
    jsonschema.Draft202012Validator.check_schema(tool.parameters)
    jsonschema.validate({"location": "Paris", "unit": "celsius", "hours": [1]}, tool.parameters)
    assert json.loads(tool.run('{"location": "Paris", "days": 2}')) == \
        {"location": "Paris", "unit": "celsius", "days": 2}


def test_schema_from_sphinx_docstring_and_bad_hints():
    tool = function_tool(sphinx_style)
    assert tool.description == "Search things."
    assert tool.parameters["properties"] == {
        "query": {"type": "string", "description": "What to look for."},
        "limit": {"type": "number", "description": "Upper bound.", "default": 2.5}}
    assert tool.run('{"query": "x"}') == '["x", 2.5]'

    def odd(x: complex) -> None:
        pass

    with pytest.raises(GptOssError, match="function odd, parameter x"):
        function_tool(odd)


def test_tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                          "parameters": {"type": "object", "properties": {
                                              "location": {"type": "string"}}}}},
        {"name": "now", "description": "The time."},
    ]))
    tools = load_tools_file(path)
    assert [(t.name, t.function) for t in tools] == [("get_weather", None), ("now", None)]
    assert tools[0].parameters["properties"]["location"] == {"type": "string"}
    assert "no implementation" in tools[1].run("{}")
    bad = {
        "[": "not valid JSON",
        '{"a": 1}': "expected a JSON list",
        '[{"type": "web_search"}]': "only function tools",
        '[{"name": "has space"}]': "invalid function name",
        '[{"name": "f", "parameters": []}]': "'parameters' must be a JSON Schema object",
        '[{"name": "f", "description": 3}]': "'description' must be a string",
        # A registry keeps one tool per name: the second must not silently replace the first.
        '[{"name": "f"}, {"name": "g"}, {"name": "f"}]': "tools 0 and 2 are both named 'f'",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(ToolsFileError, match=message):
            load_tools_file(path)
    with pytest.raises(ToolsFileError, match=r"missing\.json \(tools file\): not found"):
        load_tools_file(tmp_path / "missing.json")


def test_registry():
    registry = ToolRegistry([get_weather, FunctionTool("now", "Time.")])
    assert [d.name for d in registry.descriptions()] == ["get_weather", "now"]
    assert ToolRegistry.function_name("functions.get_weather") == "get_weather"
    assert ToolRegistry.function_name("python") is None
    assert "unknown function 'nope'" in registry.run("nope", "{}")


# --------------------------------------------------------------------------- python sandbox


@pytest.fixture
def python():
    tool = PythonTool(timeout=5, memory_limit=1 << 30, max_output=200)
    yield tool
    tool.close()


@pytest.mark.slow
def test_python_state_persists_and_runs_elsewhere(python):
    assert python.run("x = 20\nx + 1") == "21\n"
    assert python.run("print(x * 2)") == "40\n"
    worker_pid = int(python.run("import os; os.getpid()"))
    assert worker_pid not in (os.getpid(), os.getppid())
    cwd = python.run("os.getcwd()").strip().strip("'")
    assert cwd == python.model_workdir and python.workdir != os.getcwd()
    assert python.run("open('f.txt', 'w').write('hi')") == "2\n"
    assert os.path.exists(os.path.join(python.workdir, "f.txt"))
    assert python.run("import subprocess; subprocess.run(['echo', 'child'])\nNone") == "child\n"


@pytest.mark.slow
def test_python_errors_are_results(python):
    assert python.run("1/0").endswith("ZeroDivisionError: division by zero\n")
    assert "SyntaxError" in python.run("def f(:")
    out = python.run("print('a' * 1000)")
    assert out.startswith("a" * 200) and "[output truncated: 801 more characters]" in out
    assert python.run("b = bytearray(2 << 30)").endswith("MemoryError\n")
    assert "died (exit code 3" in python.run("import os; os._exit(3)")
    assert python.run("1 + 1") == "2\n"  # a fresh session after the death


@pytest.mark.slow
def test_python_timeout_restarts_the_session(python):
    python.timeout = 1
    python.run("kept = 1")
    assert "timed out after 1 s" in python.run("while True: pass")
    python.timeout = 5
    assert "NameError" in python.run("kept")


@pytest.mark.slow
def test_python_interrupt_restarts_the_session(python):
    """Ctrl-C does not reach the worker (its own session): `run` must kill it, or its late
    reply would answer the next call."""
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    python.run("kept = 1")
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            python.run('import time; time.sleep(1.5); print("old")')
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert python.run('print("new")') == "new\n"
    assert "NameError" in python.run("kept")


@pytest.mark.slow
def test_python_code_may_change_directory(python):
    python.run("kept = 1")
    assert python.run('import os; os.chdir("/"); print("hi")') == "hi\n"
    assert python.run("kept, os.getcwd()") == "(1, '/')\n"
    assert python.run("os.chdir('/nonexistent')").endswith("FileNotFoundError: "
                                                          "[Errno 2] No such file or directory: "
                                                          "'/nonexistent'\n")


@pytest.mark.slow
def test_python_huge_output_is_cut_in_the_worker(python):
    """100 MB of output: cut to `max_output` in the worker, well inside the timeout."""
    out = python.run("print('x' * 10**8)")
    assert out == "x" * 200 + "\n... [output truncated: 99999801 more characters]\n"
    out = python.run("print('é' * 10**6)")  # 2 MB: characters counted across read chunks
    assert out == "é" * 200 + "\n... [output truncated: 999801 more characters]\n"


@pytest.mark.slow
def test_python_file_size_limit_is_a_readable_error():
    python = PythonTool(timeout=5, memory_limit=1 << 30, file_limit=1 << 20, max_output=200)
    try:
        python.run("kept = 1")
        cut = "\n... [output truncated: 1048376 more characters]\n"
        too_large = "OSError: [Errno 27] File too large\n"
        out = python.run("for i in range(10**5): print('x' * 99)")
        assert out.startswith("x" * 99 + "\n") and cut in out and out.endswith(too_large)
        assert python.run("print('ok', kept)") == "ok 1\n"  # state kept, nothing stale
        assert python.run("open('big', 'wb').write(b'x' * (2 << 20))").endswith(too_large)
        out = python.run("import subprocess\n"
                         "subprocess.run(['sh', '-c', 'yes | head -c 3000000']).returncode")
        assert out.startswith("y\ny\n") and cut in out  # child processes are limited too
        assert python.run("print('ok', kept)") == "ok 1\n"
    finally:
        python.close()
