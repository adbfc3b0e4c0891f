"""``llmparts.masks.visible`` against small literal boolean matrices."""

from __future__ import annotations

import torch

from llmparts.masks import visible


def m(rows: list[str]) -> torch.Tensor:
    """'1' visible, '.' hidden; one string per query row."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


def vis(q_pos, k_pos, window=None) -> torch.Tensor:
    out = visible(torch.tensor(q_pos), torch.tensor(k_pos), window)
    assert out.dtype == torch.bool
    assert out.shape == (len(q_pos), 1, len(q_pos[0]), len(k_pos[0]))
    return out


def test_causal_t4():
    p = [[0, 1, 2, 3]]
    expected = m(["1...",
                  "11..",
                  "111.",
                  "1111"])
    assert torch.equal(vis(p, p)[0, 0], expected)


def test_window_2_t5():
    p = [[0, 1, 2, 3, 4]]
    expected = m(["1....",
                  "11...",
                  ".11..",
                  "..11.",
                  "...11"])
    assert torch.equal(vis(p, p, 2)[0, 0], expected)


def test_window_1_is_diagonal_and_large_window_is_causal():
    p = [[0, 1, 2, 3]]
    assert torch.equal(vis(p, p, 1)[0, 0], torch.eye(4, dtype=torch.bool))
    assert torch.equal(vis(p, p, 4)[0, 0], vis(p, p)[0, 0])
    assert torch.equal(vis(p, p, 100)[0, 0], vis(p, p)[0, 0])


def test_left_padding():
    """Padding queries (-1) see every key; real queries never see padding keys."""
    p = [[-1, -1, 0, 1, 2],
         [0, 1, 2, 3, 4]]
    out = vis(p, p)
    assert torch.equal(out[0, 0], m(["11111",
                                     "11111",
                                     "..1..",
                                     "..11.",
                                     "..111"]))
    assert torch.equal(out[1, 0], m(["1....",
                                     "11...",
                                     "111..",
                                     "1111.",
                                     "11111"]))


def test_left_padding_with_window():
    p = [[-1, -1, 0, 1, 2, 3]]
    assert torch.equal(vis(p, p, 2)[0, 0], m(["111111",
                                              "111111",
                                              "..1...",
                                              "..11..",
                                              "...11.",
                                              "....11"]))


def test_empty_key_slots_never_visible_except_for_padding_queries():
    """Keys at -1 (empty ring/cache slots) are hidden from every real query, even 'later' ones."""
    k = [[3, -1, 0, 1, -1, 2]]
    q = [[2, 3, -1]]
    expected = m(["..11.1",   # q=2: keys at positions 0, 1, 2
                  "1.11.1",   # q=3: keys 3, 0, 1, 2
                  "111111"])  # padding query: everything
    assert torch.equal(vis(q, k)[0, 0], expected)
    expected_w2 = m(["...1.1",  # q=2, window 2: keys 1, 2
                     "1....1",  # q=3: keys 3, 2
                     "111111"])
    assert torch.equal(vis(q, k, 2)[0, 0], expected_w2)


def test_ring_order_keys():
    """Keys in ring order (not sorted): visibility depends only on positions."""
    k = [[4, 5, 2, 3]]  # a ring of 4 after 6 tokens
    q = [[5]]
    assert torch.equal(vis(q, k, 4)[0, 0], m(["1111"]))  # 1 < j <= 5
    assert torch.equal(vis(q, k, 3)[0, 0], m(["11.1"]))  # 2 < j <= 5
    assert torch.equal(vis(q, k, 2)[0, 0], m(["11.."]))
    assert torch.equal(vis(q, k)[0, 0], m(["1111"]))


def test_batch_rows_independent():
    q = [[1, 2], [5, 6]]
    k = [[0, 1, 2], [4, 5, 6]]
    out = vis(q, k, 2)
    assert torch.equal(out[0, 0], m(["11.", ".11"]))
    assert torch.equal(out[1, 0], m(["11.", ".11"]))
    out = vis(q, k)
    assert torch.equal(out[0, 0], m(["11.", "111"]))
    assert torch.equal(out[1, 0], m(["11.", "111"]))


def test_matches_predicate_exhaustively():
    """Every (q, k, window) triple on a small grid against the stated predicate."""
    positions = list(range(-1, 7))
    for window in (None, 1, 2, 3, 5):
        q = torch.tensor([positions])
        out = visible(q, q, window)[0, 0]
        for a, qp in enumerate(positions):
            for b, kp in enumerate(positions):
                if qp < 0:
                    want = True
                else:
                    want = 0 <= kp <= qp and (window is None or qp - kp < window)
                assert bool(out[a, b]) == want, (qp, kp, window)
