"""The offline CLIP tokenizer reproduces CLIP's ids and SD1.x's padding."""

from __future__ import annotations

import gzip

import pytest

from lib_loraclr.sd import tokenizer as tk


@pytest.fixture(scope="module")
def tok():
    return tk.load_clip_tokenizer()


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # Reference ids of openai/clip-vit-large-patch14's tokenizer.
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("photograph of sks dogs, 123", [49406, 8853, 539, 48136, 3255, 267, 272, 273, 274, 49407]),
    ],
)
def test_known_ids(tok, text, ids):
    assert tok(text)["input_ids"] == ids


def test_case_and_whitespace_are_normalised(tok):
    assert tok("A  Photo\tof a CAT")["input_ids"] == tok("a photo of a cat")["input_ids"]


def test_padding_like_sd1(tok):
    (row,) = tk.tokenize_padded(tok, ["a photo of a cat"])
    assert len(row) == 77 and row[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(row[7:]) == {tk.EOS_ID}
    (long,) = tk.tokenize_padded(tok, ["cat " * 100])
    assert len(long) == 77 and long[0] == tk.BOS_ID and long[-1] == tk.EOS_ID and long[-2] == 2368


def test_vocabulary_derivation(tmp_path):
    bpe = tk.find_bpe_file()
    assert bpe is not None
    with gzip.open(bpe, "rt", encoding="utf-8") as fh:
        vocab, merges = tk.derive_vocab(fh.read().split("\n"))
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    symbols = tk.byte_symbols()
    assert len(set(symbols)) == 256 and all(not s.isspace() for s in symbols)


def test_explicit_folder_and_env_var(tmp_path, monkeypatch, tok):
    folder = tk.write_vocab_files(tk.find_bpe_file(), tmp_path / "clip")
    assert tk.tokenizer_dir(folder) == folder
    monkeypatch.setenv(tk.ENV_VAR, str(folder))
    assert tk.tokenizer_dir() == folder
    assert tk.load_clip_tokenizer()("a photo of a cat")["input_ids"] == tok("a photo of a cat")["input_ids"]


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(tk.TokenizerNotFoundError, match="missing vocab.json, merges.txt.*open-clip-torch"):
        tk.tokenizer_dir(tmp_path)
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    monkeypatch.setattr(tk, "find_bpe_file", lambda: None)
    with pytest.raises(tk.TokenizerNotFoundError, match=tk.ENV_VAR):
        tk.load_clip_tokenizer()


def test_bad_merge_file_is_refused():
    with pytest.raises(ValueError, match="unexpected layout"):
        tk.derive_vocab(["#version", "a b", "c"])
