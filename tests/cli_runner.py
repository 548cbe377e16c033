"""Run `mlx-gptoss` in-process through its real entry point (faster than a subprocess)."""
from __future__ import annotations

import io
import sys

from mlx_gptoss.cli import main


def cli(capsys, *args, stdin: str | bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mlx-gptoss ARGS`; `stdin` (text or bytes) is piped in."""
    if stdin is not None:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *fragments: str) -> None:
    """The CLI's error contract: exit 2, one `error: ...` line that says each fragment."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
