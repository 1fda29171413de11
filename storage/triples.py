"""Raw triples on disk -> integer-id tensors.

A dataset directory holds ``train.txt``, ``valid.txt`` and ``test.txt``: one fact per line,
``head<TAB>relation<TAB>tail``. Ids are assigned from the training split only (sorted names, so
the same files always give the same ids); valid/test facts that mention a symbol unseen in training
cannot be scored by an embedding model and are dropped, with their count kept on the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLITS = ("train", "valid", "test")
BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclass(frozen=True)
class KGDataset:
    """A knowledge graph with integer ids.

    ``train``/``valid``/``test`` are int64 tensors of shape [N, 3] holding (head, relation, tail).
    ``dropped`` counts, per evaluation split, facts removed because a symbol never occurs in train.
    """

    name: str
    entity_names: list[str]
    relation_names: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_entities(self) -> int:
        return len(self.entity_names)

    @property
    def num_relations(self) -> int:
        return len(self.relation_names)

    def all_known(self) -> torch.Tensor:
        """Every known true fact (train+valid+test), used to filter rankings."""
        return torch.cat([self.train, self.valid, self.test])


def bundled_names() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "train.txt").is_file())


def resolve_dataset_dir(name_or_dir: str | Path) -> Path:
    """A bundled dataset name, or a directory with train/valid/test files."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if (BUNDLED_DIR / str(name_or_dir)).is_dir():
        return BUNDLED_DIR / str(name_or_dir)
    raise ValueError(
        f"dataset {str(name_or_dir)!r} is neither a directory nor a bundled dataset "
        f"(bundled: {', '.join(bundled_names())})"
    )


def read_triples(path: Path) -> list[tuple[str, str, str]]:
    """Read a tab-separated triple file; malformed lines raise with file and line number."""
    if not path.is_file():
        raise ValueError(f"missing file: {path}")
    triples = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3 or not all(p.strip() for p in parts):
                raise ValueError(
                    f"{path}:{line_no}: expected 3 non-empty tab-separated fields "
                    f"(head, relation, tail), got {len(parts)}: {line[:80]!r}"
                )
            triples.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    if not triples:
        raise ValueError(f"{path}: split is empty")
    return triples


def load_dataset(name_or_dir: str | Path) -> KGDataset:
    directory = resolve_dataset_dir(name_or_dir)
    raw = {split: read_triples(directory / f"{split}.txt") for split in SPLITS}
    entities = sorted({e for h, _, t in raw["train"] for e in (h, t)})
    relations = sorted({r for _, r, _ in raw["train"]})
    entity_id = {name: i for i, name in enumerate(entities)}
    relation_id = {name: i for i, name in enumerate(relations)}

    tensors: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    for split, facts in raw.items():
        known = [
            (entity_id[h], relation_id[r], entity_id[t])
            for h, r, t in facts
            if h in entity_id and r in relation_id and t in entity_id
        ]
        if not known:
            raise ValueError(f"{directory / (split + '.txt')}: no fact uses only training symbols")
        dropped[split] = len(facts) - len(known)
        tensors[split] = torch.tensor(known, dtype=torch.int64)
    dropped.pop("train")
    return KGDataset(
        name=directory.name,
        entity_names=entities,
        relation_names=relations,
        dropped=dropped,
        **tensors,
    )
