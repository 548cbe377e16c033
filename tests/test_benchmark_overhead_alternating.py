"""benchmarks/overhead_alternating.py on a 2-layer tiny model: every implementation decodes in
every round and each figure is a real measurement of its own threads. Timings are never
asserted, only what they are made of."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "overhead_alternating.py"

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="per-thread CPU times come from Linux's /proc")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_overhead_alternating", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_three_implementations_take_turns(tmp_path):
    script = _load_script()
    results = script.alternate(layers=2, rounds=2, tokens=3, other=ROOT, cache_dir=tmp_path)
    assert list(results) == ["this", "other", "mlx-lm"]
    for figures in results.values():
        assert set(figures) == {"wall", "main", "other threads"}
        assert all(len(v) == 2 for v in figures.values())  # the warm-up round is left out
        assert all(x > 0 for x in figures["wall"] + figures["main"])
    # The other checkout is a second import of the package, not this one under another name.
    assert sys.modules["mlx_gptoss_other"].__file__ == str(ROOT / "mlx_gptoss" / "__init__.py")
    assert sys.modules["mlx_gptoss_other.benchmark"] is not sys.modules["mlx_gptoss.benchmark"]
    # Both sides of the synthetic checkpoint were written where asked.
    assert any(p.name.endswith("-mlx") for p in tmp_path.iterdir())


def test_a_threads_cpu_time_grows_with_work():
    script = _load_script()
    before = script.thread_cpu_ns()
    sum(i * i for i in range(200_000))
    after = script.thread_cpu_ns()
    assert after[os.getpid()] > before[os.getpid()]
