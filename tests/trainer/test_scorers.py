import pytest
import torch

from trainer.scorers import ComplEx, DistMult, Scorer, SeparateRoles


def _complex(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(x[..., 0::2].double(), x[..., 1::2].double())  # (re, im) pairs


def test_complex_matches_explicit_complex_arithmetic():
    g = torch.Generator().manual_seed(0)
    s, r, o = (torch.randn(5, 8, generator=g) for _ in range(3))
    expected = (_complex(r) * _complex(s) * _complex(o).conj()).sum(-1).real
    torch.testing.assert_close(ComplEx().score(s, r, o).double(), expected, rtol=1e-5, atol=1e-5)


def test_distmult_is_the_trilinear_product():
    s, r, o = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[0.5, 4.0]])
    assert DistMult().score(s, r, o).item() == pytest.approx(1 * 3 * 0.5 + 2 * -1 * 4)


class Broadcasting(Scorer):
    """A scorer that only defines score(): the candidate methods fall back to broadcasting."""

    def score(self, s, r, o):
        return -(s + r - o).norm(dim=-1)  # TransE, in a few lines


@pytest.mark.parametrize("scorer", [DistMult(), ComplEx(), Broadcasting()])
def test_candidate_scoring_agrees_with_score(scorer):
    g = torch.Generator().manual_seed(1)
    s, r, o = (torch.randn(2, 3, 6, generator=g) for _ in range(3))  # leading chunk dim
    cand = torch.randn(2, 7, 6, generator=g)
    tails = scorer.score_tails(s, r, cand)
    heads = scorer.score_heads(r, o, cand)
    assert tails.shape == heads.shape == (2, 3, 7)
    for c in range(2):
        for b in range(3):
            for n in range(7):
                assert tails[c, b, n].item() == pytest.approx(
                    scorer.score(s[c, b], r[c, b], cand[c, n]).item(), abs=1e-5
                )
                assert heads[c, b, n].item() == pytest.approx(
                    scorer.score(cand[c, n], r[c, b], o[c, b]).item(), abs=1e-5
                )


@pytest.mark.parametrize("base", [DistMult(), ComplEx()])
def test_separate_roles_score_the_subject_half_with_the_object_half(base):
    g = torch.Generator().manual_seed(2)
    s, o, cand = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g), torch.randn(5, 12, generator=g)
    r = torch.randn(3, 6, generator=g)
    roles = SeparateRoles(base)
    torch.testing.assert_close(roles.score(s, r, o), base.score(s[:, :6], r, o[:, 6:]))
    # A tail candidate is scored by its object half, a head candidate by its subject half.
    torch.testing.assert_close(roles.score_tails(s, r, cand), base.score_tails(s[:, :6], r, cand[:, 6:]))
    torch.testing.assert_close(roles.score_heads(r, o, cand), base.score_heads(r, o[:, 6:], cand[:, :6]))
    pos, tails = roles.score_and_tails(s, r, o, cand)
    torch.testing.assert_close(pos, roles.score(s, r, o))
    torch.testing.assert_close(tails, roles.score_tails(s, r, cand))


def test_separate_roles_distmult_is_cp():
    s, r, o = torch.tensor([[1.0, 2.0, 5.0, 7.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[9.0, 9.0, 0.5, 4.0]])
    # sum_i s_subject_i r_i o_object_i: the subject's (1, 2) with the object's (0.5, 4).
    assert SeparateRoles(DistMult()).score(s, r, o).item() == pytest.approx(1 * 3 * 0.5 + 2 * -1 * 4)
