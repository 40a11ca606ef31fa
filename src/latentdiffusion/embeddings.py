"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word", Sec. 4): new prompt words
whose input vectors were learned for a frozen model.

A word is an embedding's name; it stands for N vectors of each text encoder's input width. In a prompt
the word's tokens (matched as a token sequence, as AUTOMATIC1111 matches names after tokenizing) become
N placeholder ids ``vocab_size + offset``: the text encoder reads ids at or above its vocabulary from an
extra table (``TextEncoder(..., extra_vectors=)``), which the role's tokenizer carries
(``TokenizerWithEmbeddings.vectors``) and ``prompts.encode_prompts`` passes on.

Files: AUTOMATIC1111 ``.pt`` (``string_to_param: {"*": [N, D]}``, ``name``, ``step``) and ``.safetensors``
(``emb_params``), diffusers' ``learned_embeds`` (``{token: [D] or [N, D]}``), SDXL's two-part files
(``clip_l`` [N, 768], ``clip_g`` [N, 1280]). Which text encoder a part feeds is decided by its width.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.errors import UserError
from latentdiffusion.models.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from latentdiffusion.components import Components

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_PARTS = (
    "clip_l",
    "clip_g",
)  # the names SDXL embedding files give the two encoders' parts, in role order
HASH_LENGTH = 10  # the web UI's short hash: the first 10 hex digits of the file's sha256
DIFFUSERS_STEM = "learned_embeds"  # diffusers' textual-inversion file name
MAX_VECTORS = 75  # an embedding fills at most one 75-token chunk


@dataclass(frozen=True)
class Embedding:
    """A loaded embedding: its prompt word, its vectors per text-encoder role [N, D], the short hash
    written into PNG info and the training step a file states."""

    name: str
    vectors: Mapping[str, torch.Tensor]
    shorthash: str = ""
    step: int | None = None

    @property
    def length(self) -> int:
        return len(next(iter(self.vectors.values())))


OWN_FIELDS = ("base", "role", "embeddings")  # what TokenizerWithEmbeddings adds to a CLIPTokenizer


class TokenizerWithEmbeddings(CLIPTokenizer):
    """A CLIP tokenizer that also knows embedding words: ``tokenize`` turns each occurrence of a name's
    token sequence into the embedding's placeholder ids (longest name first where names share a first
    token); ``vectors`` [E, D] are the encoder's inputs of ids ``base .. base + E - 1`` (``base``: the
    text encoder's vocabulary size). Built by ``extend`` only."""

    base: int
    role: str
    embeddings: list[Embedding]

    @classmethod
    def extend(
        cls, tokenizer: CLIPTokenizer, base: int, role: str, embedding: Embedding
    ) -> TokenizerWithEmbeddings:
        """``tokenizer`` (plain or with embeddings) that also knows ``embedding`` (replacing one of the same
        name)."""
        known = tokenizer.embeddings if isinstance(tokenizer, TokenizerWithEmbeddings) else []
        extended = cls.__new__(cls)
        # the plain tokenizer's state (vocabulary, merges, settings, its built backend) is shared, not rebuilt
        extended.__dict__.update({k: v for k, v in tokenizer.__dict__.items() if k not in OWN_FIELDS})
        extended.base, extended.role = base, role
        extended.embeddings = [*(e for e in known if e.name != embedding.name), embedding]
        return extended

    @property
    def vectors(self) -> torch.Tensor:
        return torch.cat([e.vectors[self.role].float() for e in self.embeddings])

    def placeholder_ids(self, name: str) -> list[int]:
        offset = 0
        for embedding in self.embeddings:
            if embedding.name == name:
                return list(range(self.base + offset, self.base + offset + embedding.length))
            offset += embedding.length
        raise KeyError(name)

    def span(self, token: int) -> int:
        """How many placeholder ids start at ``token`` (an embedding's first id), else 0."""
        offset = self.base
        for embedding in self.embeddings:
            if token == offset:
                return embedding.length
            offset += embedding.length
        return 0

    def tokenize(self, text: str) -> list[int]:
        """CLIP's tokens of ``text`` with each embedding word's tokens replaced by its placeholder ids."""
        tokens = super().tokenize(text)
        names = sorted(((self._name_ids(e.name), e.name) for e in self.embeddings), key=lambda n: -len(n[0]))
        out, i = [], 0
        while i < len(tokens):
            match = next((n for n in names if n[0] and tokens[i : i + len(n[0])] == n[0]), None)
            if match is None:
                out.append(tokens[i])
                i += 1
            else:
                out += self.placeholder_ids(match[1])
                i += len(match[0])
        return out

    def _name_ids(self, name: str) -> list[int]:
        return super().tokenize(name)

    def used(self, text: str) -> list[str]:
        """The names of the embeddings whose words ``text`` holds, in order of first use."""
        first_ids = {self.placeholder_ids(e.name)[0]: e.name for e in self.embeddings}
        names = [first_ids[token] for token in self.tokenize(text) if token in first_ids]
        return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- files


def read_parts(path: str | os.PathLike) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    """The vector blocks of an embedding file ``[(key, [N, D])]`` and what it says about itself
    (``name``, ``step``)."""
    from latentdiffusion.checkpoints.safe_io import file_kind, load_pickled_tree, load_safetensors

    path = Path(path)
    if not path.is_file():
        raise UserError(f"embedding file {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"embedding file {path} is empty")
    if file_kind(path) == "safetensors":
        tree: Any = load_safetensors(path)
    else:
        tree = load_pickled_tree(path)
    if not isinstance(tree, Mapping):
        raise UserError(f"{path} holds a {type(tree).__name__}, not an embedding")
    info = {k: tree[k] for k in ("name", "step") if isinstance(tree.get(k), str | int)}
    return _blocks(path, tree), info


def _blocks(path: Path, tree: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree.get("string_to_param"), Mapping):  # AUTOMATIC1111 .pt
        params = tree["string_to_param"]
        blocks = [(str(k), v) for k, v in params.items() if isinstance(v, torch.Tensor)]
    elif isinstance(tree.get("emb_params"), torch.Tensor):  # AUTOMATIC1111 .safetensors
        blocks = [("emb_params", tree["emb_params"])]
    else:  # SDXL's clip_l/clip_g, or diffusers' {token: vectors}
        blocks = [(str(k), v) for k, v in tree.items() if isinstance(v, torch.Tensor)]
    if not blocks:
        raise UserError(
            f"{path} holds no embedding vectors (expected string_to_param, emb_params, "
            "clip_l/clip_g or {token: vectors})"
        )
    checked = []
    for key, tensor in blocks:
        vectors = tensor.detach().float()
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        if vectors.ndim != 2 or not 0 < len(vectors) <= MAX_VECTORS or vectors.shape[1] == 0:
            raise UserError(
                f"{path}: {key!r} has shape {tuple(tensor.shape)}; an embedding is [N, width] "
                f"with 1 <= N <= {MAX_VECTORS}"
            )
        if not torch.isfinite(vectors).all():
            raise UserError(f"{path}: {key!r} holds NaN or infinite values")
        checked.append((key, vectors.clone()))
    return checked


def embedding_roles(components: Components) -> dict[str, int]:
    """The text encoders an embedding can feed (those with a CLIP tokenizer), with their input widths."""
    roles = {}
    for role in components.family.text_roles:
        tokenizer, encoder = components.tokenizers.get(role), components.modules.get(role)
        if isinstance(tokenizer, CLIPTokenizer) and encoder is not None:
            roles[role] = encoder.config.hidden_size
    return roles


def assign_roles(
    path: Path, blocks: Sequence[tuple[str, torch.Tensor]], widths: Mapping[str, int], description: str
) -> dict[str, torch.Tensor]:
    """Each of the model's text encoders' vectors, chosen by width (SDXL's parts by name where widths tie);
    a file must fill every encoder, and every block must fit one."""
    if len(blocks) > len(widths):
        keys = ", ".join(k for k, _ in blocks)
        raise UserError(f"{path} holds {len(blocks)} embeddings ({keys}); give a file with one")
    vectors: dict[str, torch.Tensor] = {}
    named = dict(zip(SDXL_PARTS, widths, strict=False))  # clip_l -> first role, clip_g -> second
    for key, block in sorted(blocks, key=lambda b: b[0] not in named):
        fits = [r for r, w in widths.items() if w == block.shape[1] and r not in vectors]
        role = named.get(key) if named.get(key) in fits else (fits[0] if fits else None)
        if role is None:
            wanted = " or ".join(f"{w} ({r})" for r, w in widths.items())
            raise UserError(
                f"{path}: embedding {key!r} is {block.shape[1]} wide; this {description} model's "
                f"text encoders take {wanted}: the embedding is for another model"
            )
        vectors[role] = block
    missing = [r for r in widths if r not in vectors]
    if missing:
        have = ", ".join(f"{r} ({t.shape[1]})" for r, t in vectors.items())
        raise UserError(
            f"{path} has vectors for {have} only; {description} models need a part for each of "
            f"{', '.join(f'{r} ({widths[r]})' for r in widths)}"
        )
    lengths = {len(t) for t in vectors.values()}
    if len(lengths) > 1:
        raise UserError(f"{path}: the parts have different numbers of vectors {sorted(lengths)}")
    return vectors


def short_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:HASH_LENGTH]


def read_embedding(components: Components, path: str | os.PathLike, token: str | None = None) -> Embedding:
    """The embedding in ``path`` fitted to ``components``' text encoders; its word is ``token`` or the
    file's stem (as the web UI names embeddings by file)."""
    path = Path(path)
    blocks, info = read_parts(path)
    if token is None:
        token = default_word(path, blocks)
    name = token
    check_name(name)
    widths = embedding_roles(components)
    if not widths:
        raise UserError(f"{components.family.description} models have no CLIP text encoder for embeddings")
    vectors = assign_roles(path, blocks, widths, components.family.description)
    step = info.get("step") if isinstance(info.get("step"), int) else None
    return Embedding(name, vectors, short_hash(path), step)


def default_word(path: Path, blocks: Sequence[tuple[str, torch.Tensor]]) -> str:
    """The file's stem, as the web UI names embeddings; for diffusers' ``learned_embeds`` file, whose
    stem names nothing, the token it stores its vectors under."""
    key = blocks[0][0]
    if path.stem == DIFFUSERS_STEM and len(blocks) == 1 and key not in ("emb_params", "*", *SDXL_PARTS):
        return key
    return path.stem


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise UserError(f"embedding word {name!r} must be non-empty text without surrounding spaces")


def add_embedding(components: Components, embedding: Embedding) -> None:
    """Teach ``components``' tokenizers the embedding's word (the components are changed in place)."""
    empty = [
        r for r in embedding.vectors if not CLIPTokenizer.tokenize(components.tokenizers[r], embedding.name)
    ]
    if empty:
        raise UserError(f"embedding word {embedding.name!r} has no tokens; choose a word with letters")
    for role in embedding.vectors:
        room = components.tokenizers[role].max_length - 2
        if embedding.length > room:
            raise UserError(
                f"embedding {embedding.name!r} has {embedding.length} vectors; this model's prompts hold "
                f"{room} tokens per chunk"
            )
    for role in embedding.vectors:
        base = components.modules[role].config.vocab_size
        components.tokenizers[role] = TokenizerWithEmbeddings.extend(
            components.tokenizers[role], base, role, embedding
        )


def load_embedding(components: Components, path: str | os.PathLike, token: str | None = None) -> Embedding:
    embedding = read_embedding(components, path, token)
    add_embedding(components, embedding)
    return embedding


def load_embeddings_dir(components: Components, folder: str | os.PathLike) -> list[Embedding]:
    """Every embedding file in ``folder`` (not recursive), each named by its file's stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"embeddings folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    return [load_embedding(components, p) for p in files]


def loaded_embeddings(components: Components) -> list[Embedding]:
    """The embeddings ``components`` know, in load order."""
    for role in components.family.text_roles:
        tokenizer = components.tokenizers.get(role)
        if isinstance(tokenizer, TokenizerWithEmbeddings):
            return list(tokenizer.embeddings)
    return []


def used_embeddings(components: Components, texts: Sequence[str]) -> list[Embedding]:
    """The loaded embeddings whose words ``texts`` (prompts and negative prompts) use."""
    from latentdiffusion.prompts import parse_prompt

    known = loaded_embeddings(components)
    if not known:
        return []
    tokenizer = next(t for t in components.tokenizers.values() if isinstance(t, TokenizerWithEmbeddings))
    names: list[str] = []
    for text in texts:
        for fragment, _ in parse_prompt(text):
            names += [n for n in tokenizer.used(fragment) if n not in names]
    return [e for e in known if e.name in names]


def hashes_text(embeddings: Sequence[Embedding]) -> str:
    """The web UI's ``TI hashes`` value: ``name: hash, ...`` (``:`` and ``,`` dropped from names)."""
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in embeddings)


def embedding_settings(components: Components, texts: Sequence[str]) -> dict[str, str]:
    """The PNG-info entry of the embeddings ``texts`` use: ``{"TI hashes": ...}``, or nothing."""
    used = used_embeddings(components, texts)
    return {"TI hashes": hashes_text(used)} if used else {}


def save_embedding(
    path: str | os.PathLike, vectors: Mapping[str, torch.Tensor], name: str, step: int
) -> Path:
    """Write the web UI's ``.safetensors`` format: ``emb_params`` [N, D] for one text encoder, SDXL's
    ``clip_l``/``clip_g`` for two (in role order)."""
    from latentdiffusion.checkpoints.safe_io import save_safetensors

    path = Path(path)
    tensors = [v.detach().float().cpu().contiguous() for v in vectors.values()]
    state = {"emb_params": tensors[0]} if len(tensors) == 1 else dict(zip(SDXL_PARTS, tensors, strict=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, {"name": name, "step": str(step)})
    return path
