"""Scoring layers on top of the embedding (encoding) layer.

A scorer maps embeddings (E_s, R_r, E_o) to a real score. ``score`` takes broadcastable [..., D]
tensors; ``score_tails``/``score_heads`` score a batch against candidate entities and default to
broadcasting ``score``, so a new scorer (TransE, RotatE) needs only ``score``. Bilinear scorers
override them with one matrix product, which is what makes shared negatives and 1-vs-all cheap.
"""

from __future__ import annotations

from typing import Literal

import torch


class Scorer:
    name = ""

    def score(self, s: torch.Tensor, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Scores of facts: s, r, o broadcastable [..., D] -> [...]."""
        raise NotImplementedError

    def score_tails(self, s_BD: torch.Tensor, r_BD: torch.Tensor, cand_ND: torch.Tensor) -> torch.Tensor:
        """Score (s, r, c) for every candidate tail c: [..., B, D] x [..., N, D] -> [..., B, N]."""
        return self.score(s_BD.unsqueeze(-2), r_BD.unsqueeze(-2), cand_ND.unsqueeze(-3))

    def score_heads(self, r_BD: torch.Tensor, o_BD: torch.Tensor, cand_ND: torch.Tensor) -> torch.Tensor:
        """Score (c, r, o) for every candidate head c: [..., B, D] x [..., N, D] -> [..., B, N]."""
        return self.score(cand_ND.unsqueeze(-3), r_BD.unsqueeze(-2), o_BD.unsqueeze(-2))

    def score_and_tails(
        self, s_BD: torch.Tensor, r_BD: torch.Tensor, o_BD: torch.Tensor, cand_ND: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the facts (s, r, o) [..., B] and of (s, r, c) for every candidate tail c [..., B, N]."""
        return self.score(s_BD, r_BD, o_BD), self.score_tails(s_BD, r_BD, cand_ND)


class BilinearScorer(Scorer):
    """A scorer linear in the candidate: score(s, r, c) = tail_query(s, r) . c and
    score(c, r, o) = head_query(r, o) . c, so scoring N candidates is one matrix product."""

    def tail_query(self, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_query(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, s: torch.Tensor, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return (self.tail_query(s, r) * o).sum(-1)

    def score_tails(self, s_BD: torch.Tensor, r_BD: torch.Tensor, cand_ND: torch.Tensor) -> torch.Tensor:
        return self.tail_query(s_BD, r_BD) @ cand_ND.transpose(-1, -2)

    def score_heads(self, r_BD: torch.Tensor, o_BD: torch.Tensor, cand_ND: torch.Tensor) -> torch.Tensor:
        return self.head_query(r_BD, o_BD) @ cand_ND.transpose(-1, -2)

    def score_and_tails(
        self, s_BD: torch.Tensor, r_BD: torch.Tensor, o_BD: torch.Tensor, cand_ND: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One tail query serves the facts and their tail corruptions.
        query = self.tail_query(s_BD, r_BD)
        return (query * o_BD).sum(-1), query @ cand_ND.transpose(-1, -2)


class DistMult(BilinearScorer):
    """<R_r, E_s, E_o> = sum_i r_i s_i o_i (Yang et al., 2015)."""

    name = "distmult"

    def tail_query(self, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return s * r

    def head_query(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return r * o


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """[..., D] real with (re, im) pairs -> [..., D/2] complex, a view when the strides allow one."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    return torch.view_as_complex(pairs)


def _as_real(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z).flatten(-2)


class ComplEx(BilinearScorer):
    """Re(<R_r, E_s, conj(E_o)>) (Trouillon et al., 2016); a D-vector holds D/2 (real, imaginary) pairs.

    Pairs, not halves, so a vector is a view of torch's complex numbers: a query is one complex product
    (one kernel each way) instead of four real products, a sum, a difference and a concatenation.
    """

    name = "complex"

    def tail_query(self, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # Re(q . conj(c)) with q = s * r is the real dot product of q's and c's (re, im) pairs.
        return _as_real(_as_complex(s) * _as_complex(r))

    def head_query(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        # Re(c . r . conj(o)) = Re(conj(c) . conj(r) . o): the real dot product of c with conj(r) * o.
        return _as_real(_as_complex(r).conj() * _as_complex(o))


class SeparateRoles(BilinearScorer):
    """Each entity a subject vector and an object vector, held side by side in one 2D-wide row:
    score(s, r, o) = base(s_subject, r, o_object), a CP model (Hitchcock, 1927; Lacroix et al., 2018)
    for DistMult. The authors' published runs trained this way (a flag parsed wrongly).

    The queries are padded with zeros over the other role, so a candidate's whole row is still one
    dot product and every bilinear path (shared negatives, 1-vs-all, evaluation) serves unchanged.
    """

    def __init__(self, base: BilinearScorer) -> None:
        self.base, self.name = base, base.name

    def tail_query(self, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        query = self.base.tail_query(s[..., : r.shape[-1]], r)
        return torch.cat([torch.zeros_like(query), query], -1)

    def head_query(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        query = self.base.head_query(r, o[..., r.shape[-1] :])
        return torch.cat([query, torch.zeros_like(query)], -1)


ScorerName = Literal["distmult", "complex"]
SCORERS: dict[ScorerName, type[Scorer]] = {"distmult": DistMult, "complex": ComplEx}
"""The scorers by config name (``model.scorer``); a new one is added here and to ``ScorerName``."""


def build_scorer(name: ScorerName, separate_roles: bool = False) -> Scorer:
    scorer = SCORERS[name]()
    if separate_roles:
        assert isinstance(scorer, BilinearScorer), f"{name}: separate roles need a bilinear scorer"
        return SeparateRoles(scorer)
    return scorer
