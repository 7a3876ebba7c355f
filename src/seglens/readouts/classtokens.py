"""Class names -> vocabulary tokens, for the readouts that need no training (logit, embedding lens).

Each class gets the tokens of its names (the dataset's name and its synonyms, from a shipped
synonym file or a comma-separated class name) in the model's own tokenizer, encoded as " name"
without special tokens. Classes whose tokens coincide are listed: the lens cannot tell them apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from itertools import combinations

import torch

from seglens.readouts.options import SUBTOKEN_MODES

log = logging.getLogger(__name__)

#: Datasets with a shipped synonym file (``seglens/readouts/synonyms/<name>.txt``).
SYNONYM_DATASETS = ("ade20k", "voc", "cityscapes", "coco-stuff")


def parse_names(line: str) -> list[str]:
    """``"sofa, couch, lounge"`` -> ``["sofa", "couch", "lounge"]`` (empty parts dropped)."""
    return [part.strip() for part in line.split(",") if part.strip()]


def read_synonyms(text: str) -> list[list[str]]:
    """A synonym file's text -> one name list per class, in class order (``#`` lines skipped)."""
    lines = [line.strip() for line in text.splitlines()]
    return [parse_names(line) for line in lines if line and not line.startswith("#")]


def shipped_synonyms(dataset: str) -> list[list[str]] | None:
    """The synonym lists shipped for ``dataset`` (``SYNONYM_DATASETS``), or None."""
    if dataset not in SYNONYM_DATASETS:
        return None
    text = resources.files("seglens.readouts").joinpath(f"synonyms/{dataset}.txt").read_text()
    return read_synonyms(text)


def class_synonyms(class_names: list[str], dataset: str | None = None) -> list[list[str]]:
    """The names each class is read by: the shipped synonyms of ``dataset`` when there are any,
    otherwise each class name split at commas (a folder dataset's ``classes.txt`` line
    ``"sofa, couch"`` gives both).

    Raises:
        ValueError: the shipped file does not list the dataset's classes in its order.
    """
    shipped = shipped_synonyms(dataset) if dataset else None
    if shipped is None:
        return [parse_names(name) or [name] for name in class_names]
    heads = [names[0] for names in shipped]
    if heads != list(class_names):
        bad = next(
            (i for i, (a, b) in enumerate(zip(heads, class_names, strict=False)) if a != b),
            min(len(heads), len(class_names)),
        )
        raise ValueError(
            f"synonyms/{dataset}.txt lists {len(heads)} classes and the dataset {len(class_names)};"
            f" they first differ at class {bad}. The file's first name on each line must be the "
            "dataset's class name, in class order"
        )
    return shipped


@dataclass(frozen=True)
class ClassTokens:
    """Which vocabulary rows read each class.

    Attributes:
        class_names: C names (the dataset's).
        entries: per readable name (one per synonym, or per sub-token with ``max``): (class index,
            the name, its token ids). A class's score is the best over its entries; an entry's
            score is its single row, or the mean of its rows (``mean``).
        mode: ``first``, ``max`` or ``mean`` (``SUBTOKEN_MODES``).
        unreadable: classes none of whose names gives a token (the lens never predicts them).
        collisions: (class a, class b, token ids) for classes that share an entry's tokens.
    """

    class_names: list[str]
    entries: list[tuple[int, str, tuple[int, ...]]]
    mode: str
    unreadable: list[str] = field(default_factory=list)
    collisions: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def rows(self) -> list[int]:
        """The distinct vocabulary ids the entries use, sorted (the K rows the lens reads)."""
        return sorted({t for _, _, ids in self.entries for t in ids})

    def entry_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, E) float32 weights turning K row scores into E entry scores (a selection, or a mean
        over an entry's rows), and (E,) int64 class of each entry."""
        rows = {t: k for k, t in enumerate(self.rows())}
        weights = torch.zeros(len(rows), len(self.entries))
        for e, (_, _, ids) in enumerate(self.entries):
            for t in ids:
                weights[rows[t], e] += 1.0 / len(ids)
        classes = torch.tensor([c for c, _, _ in self.entries], dtype=torch.long)
        return weights, classes

    def to_dict(self, tokenizer=None) -> dict:
        """JSON-friendly: per class its entries (name, ids, and token strings with a tokenizer),
        the unreadable classes and the colliding pairs."""

        def text(ids):
            return tokenizer.convert_ids_to_tokens(list(ids)) if tokenizer is not None else None

        per_class = {name: [] for name in self.class_names}
        for c, name, ids in self.entries:
            per_class[self.class_names[c]].append(
                {"name": name, "ids": list(ids), "tokens": text(ids)}
            )
        return {
            "mode": self.mode,
            "classes": per_class,
            "unreadable": list(self.unreadable),
            "collisions": [
                {"classes": [a, b], "ids": list(ids), "tokens": text(ids)}
                for a, b, ids in self.collisions
            ],
        }


def name_tokens(tokenizer, name: str) -> list[int]:
    """The sub-token ids of ``" " + name`` in ``tokenizer``, no special tokens; sub-tokens that
    are only whitespace (SentencePiece's lone "▁", a byte-level space) and unknown tokens are
    dropped (the name then has no reading when an unknown token was among them)."""
    ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kept = []
    for t in ids:
        piece = tokenizer.decode([t])
        if t in special or not piece.strip():
            continue
        kept.append(int(t))
    return kept


def class_tokens(
    tokenizer, class_synonym_lists: list[list[str]], class_names: list[str], mode: str = "first"
) -> ClassTokens:
    """The ``ClassTokens`` of C classes in ``tokenizer``.

    Args:
        tokenizer: the model's own tokenizer (a HF tokenizer).
        class_synonym_lists: per class, its names (``class_synonyms``).
        class_names: the C dataset class names.
        mode: ``first`` (the first sub-token of each name), ``max`` (each sub-token is an entry)
            or ``mean`` (an entry reads the mean of its sub-tokens' rows).

    Raises:
        ValueError: an unknown ``mode``, or as many synonym lists as classes are not given.
    """
    if mode not in SUBTOKEN_MODES:
        raise ValueError(f"lens sub-token mode {mode!r} is not one of {SUBTOKEN_MODES}")
    if len(class_synonym_lists) != len(class_names):
        raise ValueError(f"{len(class_synonym_lists)} synonym lists for {len(class_names)} classes")
    entries: list[tuple[int, str, tuple[int, ...]]] = []
    unreadable = []
    for c, names in enumerate(class_synonym_lists):
        before = len(entries)
        for name in names:
            ids = name_tokens(tokenizer, name)
            if not ids:
                continue
            if mode == "first":
                parts = [(ids[0],)]
            elif mode == "max":
                parts = [(t,) for t in ids]
            else:
                parts = [tuple(ids)]
            for part in parts:
                if (c, part) not in {(e[0], e[2]) for e in entries[before:]}:
                    entries.append((c, name, part))
        if len(entries) == before:
            unreadable.append(class_names[c])
    if unreadable:
        log.warning("lens: no token for classes %s; the lens never predicts them", unreadable)
    owners: dict[tuple[int, ...], list[int]] = {}
    for c, _, ids in entries:
        owners.setdefault(ids, [])
        if c not in owners[ids]:
            owners[ids].append(c)
    collisions = [
        (class_names[a], class_names[b], ids)
        for ids, cs in owners.items()
        for a, b in combinations(sorted(cs), 2)
    ]
    if collisions:
        shown = ", ".join(f"{a}/{b}" for a, b, _ in collisions[:10])
        more = f" (+{len(collisions) - 10} more)" if len(collisions) > 10 else ""
        log.warning("lens: %d class pairs share tokens: %s%s", len(collisions), shown, more)
    return ClassTokens(list(class_names), entries, mode, unreadable, collisions)
