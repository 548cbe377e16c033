"""The package's public names: lazy (importing it, or the CLI, starts no NumPy/MLX threads, so
the CLI can set up Ctrl-C first), and the same objects an eager import gave."""
from __future__ import annotations

import subprocess
import sys
import types

from helpers import subprocess_env

import mlx_gptoss


def test_public_names_resolve_to_the_library_objects():
    import mlx_gptoss.generate  # the submodule of the same name as the function

    from mlx_gptoss import Engine, batch_generate, generate
    from mlx_gptoss.engine import Engine as engine_class
    assert isinstance(generate, types.FunctionType) and generate.__module__ == "mlx_gptoss.generate"
    assert mlx_gptoss.generate is generate
    assert Engine is engine_class and callable(batch_generate)
    assert set(mlx_gptoss.__all__) <= set(dir(mlx_gptoss))
    for name in mlx_gptoss.__all__:
        assert getattr(mlx_gptoss, name) is not None, name


def test_importing_the_package_or_the_cli_is_free():
    code = ("import os, sys, mlx_gptoss, mlx_gptoss.cli; "
            "print(len(os.listdir('/proc/self/task')), 'numpy' in sys.modules, "
            "'mlx.core' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["1", "False", "False"]
