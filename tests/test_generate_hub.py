"""Models by name: a pre-populated Hugging Face hub cache, no network."""
from __future__ import annotations

import shutil

import pytest

from mlx_gptoss.errors import GptOssError
from mlx_gptoss.generate import generate
from mlx_gptoss.hub import load, resolve_model
from mlx_gptoss.sampling import SamplingParams

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache, repo_id: str, source) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(tmp_path / "ours"))
    return tmp_path / "hub"


@pytest.mark.slow
def test_repo_id_is_converted_once_and_reused_offline(chat_checkpoint, offline_hub, tmp_path,
                                                      monkeypatch, capsys):
    put_in_hub_cache(offline_hub, "openai/gpt-oss-tiny", chat_checkpoint)
    path = resolve_model("openai/gpt-oss-tiny", progress=False)
    assert path == tmp_path / "ours" / "models" / "openai--gpt-oss-tiny"
    assert "mlx_gptoss" in (path / "config.json").read_text()  # the converter's marker
    import mlx_gptoss.converter as converter

    monkeypatch.setattr(converter, "convert", lambda *a, **k: pytest.fail("converted twice"))
    model, tok = load("openai/gpt-oss-tiny", "float32", progress=False)
    assert model.model_dir == path
    direct, _ = load(chat_checkpoint, "float32")
    greedy = SamplingParams(temperature=0)
    assert generate(model, tok, "Hi", max_tokens=8, sampling=greedy).tokens == \
        generate(direct, tok, "Hi", max_tokens=8, sampling=greedy).tokens
    from mlx_gptoss.cli import main

    with pytest.raises(SystemExit) as done:
        main(["generate", "-m", "openai/gpt-oss-tiny", "-p", "Hi", "--max-tokens", "8", "--temp",
              "0"])
    assert done.value.code == 0
    assert capsys.readouterr().out  # the CLI resolves names the same way


def test_converted_repo_is_used_from_the_hub_cache(chat_checkpoint, offline_hub, tmp_path):
    from mlx_gptoss.converter import convert

    converted = convert(chat_checkpoint, tmp_path / "conv", progress=False).destination
    put_in_hub_cache(offline_hub, "someone/gpt-oss-tiny-mlx", converted)
    path = resolve_model("someone/gpt-oss-tiny-mlx", progress=False)
    assert path.parent.name == "snapshots" and path.name == COMMIT
    assert not (tmp_path / "ours" / "models").exists()


def test_missing_repo_offline_is_a_clear_error(offline_hub):
    with pytest.raises(GptOssError, match="openai/gpt-oss-999b: offline, and it is not in the "
                                          "hub cache"):
        resolve_model("openai/gpt-oss-999b", progress=False)
    with pytest.raises(GptOssError, match="no/such: model directory not found"):
        resolve_model("./no/such")
