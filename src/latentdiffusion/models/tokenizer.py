"""The CLIP byte-pair-encoding tokenizer (Radford et al. 2021), run by the `tokenizers` library.

CLIP tokenizes lower-cased, whitespace-normalised text: a regular expression splits it into words,
numbers (one digit each) and runs of punctuation; each piece is mapped byte by byte onto printable
unicode characters (the GPT-2 byte table, Radford et al. 2019), its last symbol is marked with
``</w>``, and the 48,894 ranked merges of Sennrich et al. 2016's byte-pair encoding join symbols.
The vocabulary (49,408 entries) is the 256 byte symbols, the same with ``</w>``, one entry per merge,
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

The Rust tokenizer is built on first use, so constructing a ``CLIPTokenizer`` and importing this
module stay cheap.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from collections.abc import Mapping, Sequence
from functools import cache, cached_property
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.files import atomic_write

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenisation pattern: special tokens, English contractions, letter runs, single digits,
# and runs of everything else that is not whitespace.
SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
BUNDLED_MERGES = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file, so vocab = 49,408

Merges = list[tuple[str, str]]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (Radford et al. 2019).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to chr(256 + n) so
    that no BPE symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: byte symbols, byte symbols + ``</w>``, merges, start, end."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


@cache
def bundled_vocab_and_merges() -> tuple[dict[str, int], Merges]:
    """The vocabulary and merges of OpenAI CLIP, from the merge list shipped in ``data/``."""
    raw = (files("latentdiffusion") / "data" / BUNDLED_MERGES).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # line 0 is a version header
    merges = [_parse_merge(line) for line in lines[1 : NUM_MERGES + 1]]
    return build_vocab(merges), merges


def _parse_merge(line: str) -> tuple[str, str]:
    left, right = line.split()
    return left, right


def clean_text(text: str) -> str:
    """The part of CLIP's normalisation done in Python: entities such as ``&amp;`` become characters.

    CLIP unescapes twice so that doubly escaped web captions (``&amp;amp;``) come out clean. NFC,
    whitespace collapsing and lower-casing follow in the Rust normaliser.
    """
    return html.unescape(html.unescape(text))


class CLIPTokenizer:
    """Text -> CLIP token ids, framed and padded the way Stable Diffusion feeds its text encoder.

    ``pad_token_id`` is 49407 (end of text) for SD 1.x and 0 (``!``) for SD 2.x. ``max_length``
    counts the start and end tokens, so at most ``max_length - 2`` text tokens survive truncation.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_token_id: int = 49407,
        max_length: int = 77,
    ) -> None:
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token} token; is this a CLIP tokenizer?")
        if not 0 <= pad_token_id < len(vocab):
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary (size {len(vocab)})")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.vocab = vocab
        self.merges = merges
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]

    @classmethod
    def from_bundled(cls, pad_token_id: int = 49407, max_length: int = 77) -> CLIPTokenizer:
        """OpenAI CLIP's tokenizer from the merge list shipped with this package."""
        vocab, merges = bundled_vocab_and_merges()
        return cls(vocab, merges, pad_token_id=pad_token_id, max_length=max_length)

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, pad_token_id: int | None = None, max_length: int | None = None
    ) -> CLIPTokenizer:
        """A diffusers/transformers ``tokenizer/`` folder (``vocab.json`` and ``merges.txt``).

        ``pad_token_id`` and ``max_length`` default to the folder's ``tokenizer_config.json``
        (``pad_token``, ``model_max_length``) when it names them, else to 49407 and 77.
        """
        folder = Path(path)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}; expected a CLIP tokenizer folder")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = _read_merges(folder / "merges.txt")
        settings = _read_settings(folder)
        if pad_token_id is None:
            pad_token_id = vocab.get(_token_content(settings.get("pad_token")), vocab.get(EOS_TOKEN, 0))
        if max_length is None:
            max_length = _max_length(settings.get("model_max_length"))
        return cls(vocab, merges, pad_token_id=pad_token_id, max_length=max_length)

    def save(self, path: str | os.PathLike) -> None:
        """Write a transformers-compatible ``tokenizer/`` folder that ``from_folder`` reads back."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        id_to_token = {i: t for t, i in self.vocab.items()}
        settings = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": id_to_token[self.pad_token_id],
        }
        _write_atomic(folder / "vocab.json", json.dumps(dict(self.vocab), ensure_ascii=False))
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        _write_atomic(folder / "merges.txt", "#version: 0.2\n" + merges)
        _write_atomic(folder / "tokenizer_config.json", json.dumps(settings, indent=2))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @cached_property
    def _backend(self) -> Any:
        return _build_backend(self.vocab, self.merges)

    def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text``: no start or end token, no truncation (for prompt chunking)."""
        return self._backend.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, max_length]: start, text truncated to max_length - 2, end, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.bos_token_id, *self.tokenize(text)[: self.max_length - 2], self.eos_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids

    def __getstate__(self) -> dict[str, Any]:
        # the Rust tokenizer is rebuilt on demand, so pickles (DataLoader workers) stay small
        state = dict(self.__dict__)
        state.pop("_backend", None)
        return state


def _build_backend(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> Any:
    """A `tokenizers` pipeline that reproduces CLIP's normalisation, split and BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    model = BPE(
        vocab=dict(vocab),
        merges=list(merges),
        end_of_word_suffix=END_OF_WORD,
        continuing_subword_prefix="",
        unk_token=EOS_TOKEN,  # never used: every byte has a symbol
        fuse_unk=False,
    )
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # keep the pattern's matches, drop the whitespace between them; then map bytes to symbols
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    backend.add_special_tokens([AddedToken(t, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
    return backend


def _read_merges(path: Path) -> Merges:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [_parse_merge(line) for line in lines if line.strip() and not line.startswith("#version")]


def _read_settings(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    return token.get("content") if isinstance(token, dict) else token


def _max_length(value: Any) -> int:
    # transformers writes a huge sentinel when the length was never set
    return value if isinstance(value, int) and 2 <= value <= 1_000_000 else 77


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
