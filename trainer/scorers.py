"""Scoring layers on top of the embedding (encoding) layer.

A scorer maps embeddings (E_s, R_r, E_o) to a real score. ``score`` takes broadcastable [..., D]
tensors; ``score_tails``/``score_heads`` score a batch against candidate entities and default to
broadcasting ``score``, so a new scorer (TransE, RotatE) needs only ``score``. Bilinear scorers
override them with one matrix product, which is what makes shared negatives and 1-vs-all cheap.
"""

from __future__ import annotations

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


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # chunk, not two slices: its backward is one concatenation, where each slice's backward fills a
    # zero tensor of the whole input and copies into it.
    re, im = x.chunk(2, dim=-1)
    return re, im


class ComplEx(BilinearScorer):
    """Re(<R_r, E_s, conj(E_o)>) (Trouillon et al., 2016); a D-vector holds D/2 real then D/2 imaginary parts."""

    name = "complex"

    def tail_query(self, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # Re(q . conj(c)) with q = s * r is the real dot product of [q_re, q_im] and [c_re, c_im].
        s_re, s_im = _halves(s)
        r_re, r_im = _halves(r)
        return torch.cat([s_re * r_re - s_im * r_im, s_re * r_im + s_im * r_re], dim=-1)

    def head_query(self, r: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        # Re(c . q) with q = r * conj(o) is the real dot product of [c_re, c_im] and [q_re, -q_im].
        r_re, r_im = _halves(r)
        o_re, o_im = _halves(o)
        return torch.cat([r_re * o_re + r_im * o_im, r_re * o_im - r_im * o_re], dim=-1)


SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (DistMult, ComplEx)}


def build_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"model.scorer={name!r}: expected one of {', '.join(SCORERS)}")
    return SCORERS[name]()
