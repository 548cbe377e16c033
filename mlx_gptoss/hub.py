"""Models by name: a local directory, or a Hugging Face repo id fetched and converted once.

`openai/gpt-oss-20b` is downloaded with huggingface_hub (only the files `load` needs: no
`original/` or `metal/` copies), converted into `~/.cache/mlx-gptoss/models/openai--gpt-oss-20b`
(or under `$MLX_GPTOSS_CACHE`), and read from there ever after, online or not. A repo that is
already an MLX conversion is used straight from the hub cache. Offline (`HF_HUB_OFFLINE`,
`MLX_GPTOSS_OFFLINE`) only the hub cache is consulted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from .config import load_generation_config
from .env import is_offline, read_json, user_cache_dir
from .errors import ConfigError, GptOssError
from .formats import CONVERTED_MARKER
from .loading import load as load_dir
from .model import Model
from .sampling import SamplingParams

ALLOW_PATTERNS = ["config.json", "generation_config.json", "model.safetensors.index.json",
                  "*.safetensors", "o200k_base.tiktoken", "dtypes.json"]
IGNORE_PATTERNS = ["original/*", "metal/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def models_dir() -> Path:
    return user_cache_dir() / "models"


def resolve_model(name: str | os.PathLike, *, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> Path:
    """The local model directory for a path or a hub repo id (downloading/converting once)."""
    log = log or (lambda line: None)
    path = Path(name).expanduser()
    text = str(name)
    if path.exists() or not _REPO_ID.match(text) or text.startswith((".", "~")):
        if not path.is_dir():
            raise GptOssError(f"{path}: model directory not found")
        return path
    converted = models_dir() / text.replace("/", "--")
    if (converted / "config.json").is_file():
        return converted
    snapshot = _download(text, progress)
    raw = read_json(snapshot / "config.json", f"config of {text}", expect=dict, error=ConfigError)
    if CONVERTED_MARKER in raw:
        return snapshot
    from .converter import convert

    log(f"converting {text} once into {converted}")
    convert(snapshot, converted, progress=progress, log=log)
    return converted


def _download(repo_id: str, progress: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:
        raise GptOssError(f"{repo_id}: fetching models by name needs huggingface_hub "
                          "(pip install huggingface_hub), or pass a local directory") from None
    offline = is_offline()
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        folder = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS, local_files_only=offline,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except LocalEntryNotFoundError:
        where = "offline, and it is not in the hub cache" if offline else \
            "not in the hub cache and the hub cannot be reached"
        raise GptOssError(f"{repo_id}: {where}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptOssError(f"{repo_id}: download failed ({first})") from None
    return Path(folder)


def load(model: str | os.PathLike, dtype: str | mx.Dtype | None = None, *,
         adapter: str | os.PathLike | None = None, progress: bool = True,
         shard: Any = None) -> tuple[Model, Any]:
    """`(model, tokenizer)` for a model directory or hub repo id.

    The model's `sampling_defaults` and `generation_config` (eos ids: see
    `GenerationConfig.stop_tokens`) come from its generation_config.json; generation uses them
    unless told otherwise. `dtype` is the compute dtype of the unquantized weights; the default
    depends on the device: float32 activations on the CPU (much faster there; the vocabulary
    matrices stay bf16), the checkpoint's bf16 on a GPU (see `loading.resolve_dtype`).
    `adapter`: a LoRA adapter directory (PEFT's `adapter_config.json` +
    `adapter_model.safetensors`), applied unfused. `shard`: one distributed rank's share
    (`distributed.load` passes it).
    """
    path = resolve_model(model, progress=progress)
    net, tokenizer = load_dir(path, dtype, adapter, shard)
    net.generation_config = load_generation_config(path, net.config)
    net.sampling_defaults = SamplingParams.from_model_dir(path)
    net.model_dir = path
    return net, tokenizer
