"""The real CLIP BPE tokenizer of Stable Diffusion 1.x, without downloads.

Token indices matter to us (CLoRA binds LoRAs to the positions of subject words), so tests and the
CLI must tokenize exactly as the WebUI does: CLIP's byte-level BPE with 49408 ids,
``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, padded to 77 with the end token.

transformers' ``CLIPTokenizer`` needs ``vocab.json`` + ``merges.txt``, which normally come from the
Hugging Face hub. The BPE merge list itself ships inside PyPI packages (open-clip-torch's
``open_clip/bpe_simple_vocab_16e6.txt.gz``, clip-anytorch's ``clip/bpe_simple_vocab_16e6.txt.gz``);
the vocabulary is a pure function of it (CLIP's construction, re-derived here):

    256 byte symbols, the same 256 with "</w>", one entry per merge (the pair joined),
    then <|startoftext|>, <|endoftext|>                       -> 49408 ids

We locate that file WITHOUT importing the package (open_clip imports torchvision at import time),
derive both files once into a cache directory, and load them with transformers. An explicit
directory holding ``vocab.json``/``merges.txt`` (argument or ``LORACLR_CLIP_TOKENIZER``) wins.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib_loraclr.errors import LoraClrError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENV_VAR = "LORACLR_CLIP_TOKENIZER"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
# The merge list of CLIP's released BPE: line 0 is a version header, then 48894 merges are used.
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# (top-level package, file inside it): packages that ship CLIP's merge list.
_BPE_SOURCES = (("open_clip", _BPE_FILE), ("clip", _BPE_FILE))
_INSTALL_HINT = (
    "install the BPE file with `python3 -m pip install --no-deps open-clip-torch` (only its data file is "
    f"used), or point {ENV_VAR} at a folder holding vocab.json and merges.txt "
    "(e.g. the tokenizer/ folder of a Stable Diffusion diffusers model)"
)


class TokenizerNotFoundError(LoraClrError, FileNotFoundError):
    """No CLIP vocabulary available offline."""


def byte_symbols() -> list[str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode symbol table, in vocabulary order.

    Printable latin-1 bytes map to themselves; the others (control chars, space, ...) are shifted to
    code points from 256 upwards so that every byte has a visible, whitespace-free symbol.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable]
    shift = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols


def derive_vocab(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list from the lines of ``bpe_simple_vocab_16e6.txt``."""
    merges = list(bpe_lines[1 : 1 + _N_MERGES])
    if len(merges) != _N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"BPE merge list has an unexpected layout ({len(merges)} merges, need {_N_MERGES})")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived CLIP vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def find_bpe_file() -> Path | None:
    """Locate CLIP's merge file inside an installed package, without importing the package."""
    for package, name in _BPE_SOURCES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / name
            if candidate.is_file():
                return candidate
    return None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(tempfile.gettempdir(), "loraclr-cache")
    return Path(root) / "loraclr" / "clip_tokenizer"


def write_vocab_files(bpe_file: Path, out_dir: Path) -> Path:
    """Derive ``vocab.json`` + ``merges.txt`` from ``bpe_file`` into ``out_dir`` (atomic writes)."""
    with gzip.open(bpe_file, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    vocab, merges = derive_vocab(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    payloads = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in payloads.items():
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, out_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out_dir


def tokenizer_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder with ``vocab.json``/``merges.txt`` to use: argument, env var, or derived cache."""
    explicit = path if path is not None else os.environ.get(ENV_VAR)
    if explicit:
        folder = Path(explicit)
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise TokenizerNotFoundError(f"{folder}: missing {', '.join(missing)}; {_INSTALL_HINT}")
        return folder
    bpe = find_bpe_file()
    if bpe is None:
        raise TokenizerNotFoundError(f"the CLIP tokenizer vocabulary was not found offline; {_INSTALL_HINT}")
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:12]
    folder = _cache_dir() / digest
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        log.info("deriving CLIP vocab.json/merges.txt from %s into %s", bpe, folder)
        write_vocab_files(bpe, folder)
    return folder


@lru_cache(maxsize=4)
def _load(folder: str) -> Any:
    from transformers import CLIPTokenizer

    # from_pretrained on a local folder reads vocab.json/merges.txt in transformers 4.x and 5.x alike
    # and never touches the network when given a directory.
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH, local_files_only=True)
    if tok.bos_token_id != BOS_ID or tok.eos_token_id != EOS_ID or tok.pad_token_id != EOS_ID:
        raise TokenizerNotFoundError(
            f"{folder}: not the CLIP vocabulary Stable Diffusion uses (bos={tok.bos_token_id}, eos={tok.eos_token_id}, "
            f"pad={tok.pad_token_id}; expected {BOS_ID}, {EOS_ID}, {EOS_ID}); {_INSTALL_HINT}"
        )
    return tok


def load_clip_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """SD1.x's CLIP tokenizer (a transformers ``CLIPTokenizer``), built offline and cached per process.

    ``path``: a folder with ``vocab.json`` and ``merges.txt``; default ``$LORACLR_CLIP_TOKENIZER``,
    else derived from the BPE file an installed open-clip-torch / clip-anytorch ships.
    Raises :class:`TokenizerNotFoundError` saying how to get the vocabulary.
    """
    return _load(str(tokenizer_dir(path)))


def tokenize_padded(
    tokenizer: Any, prompts: list[str], max_length: int = MAX_LENGTH, pad_id: int | None = None
) -> list[list[int]]:
    """SD's input ids: ``[BOS] tokens [EOS] [pad]...`` padded/truncated to ``max_length`` (77);
    the padding is the end token again (CLIP's, SD1.x) unless ``pad_id`` says otherwise
    (OpenCLIP's 0, SDXL's second tower).

    Truncation keeps the final end token, as the WebUI's first 75-token chunk and diffusers do.
    """
    pad = EOS_ID if pad_id is None else pad_id
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    out = []
    for row in ids:
        row = [BOS_ID, *row[: max_length - 2], EOS_ID]
        out.append(row + [pad] * (max_length - len(row)))
    return out


def pad_after_end(ids: torch.Tensor, pad_id: int, end_id: int = EOS_ID) -> torch.Tensor:
    """``ids`` (B, n) padded with the end token, re-padded with ``pad_id`` after each row's first
    end token (OpenCLIP's padding, as A1111 re-pads its chunks for SDXL's second tower)."""
    is_end = (ids == end_id).int()
    after = (is_end.cumsum(dim=1) - is_end) > 0  # past the first end token
    return ids.masked_fill(after, pad_id)
