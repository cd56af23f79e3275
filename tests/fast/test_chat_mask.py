"""Chat data as pure functions: packing whole conversations into padded samples of token words, and the spans
`bigtrain data show` cuts a sample into (mask runs, document starts)."""
import numpy as np

from bigtrain.data import words
from bigtrain.data.chat import Packer
from bigtrain.data.show import sample_spans

PAD = 0


def conv(n, first_id, trained_from):
    """A conversation of n tokens (ids first_id...) whose tokens from `trained_from` on are trained."""
    return np.arange(first_id, first_id + n), np.arange(n) >= trained_from


def test_packer_packs_whole_conversations_greedily_and_pads():
    p = Packer(8, PAD)
    out = [p.add(*conv(3, 10, 1)), p.add(*conv(4, 20, 2)), p.add(*conv(2, 30, 0)), p.add(*conv(8, 40, 5)),
           p.add(*conv(5, 50, 4)), p.close(), p.close()]
    assert [len(o) for o in out] == [0, 0, 8, 8, 8, 8, 0]  # 3 + 4 fit, + 2 does not: a new sample
    ids, trained, start, _ = words.unpack(np.concatenate(out).reshape(-1, 8))
    assert ids.tolist() == [[10, 11, 12, 20, 21, 22, 23, PAD], [30, 31, PAD, PAD, PAD, PAD, PAD, PAD],
                            list(range(40, 48)), [50, 51, 52, 53, 54, PAD, PAD, PAD]]
    assert trained.astype(int).tolist() == [[0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0],
                                            [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0, 0]]
    assert start.astype(int).tolist() == [[1, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 0, 0, 0],
                                          [1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0]]
    assert p.padding == 1 + 6 + 3 and np.concatenate(out).dtype == np.uint32


def test_sample_spans_cut_at_mask_changes_and_document_starts():
    row = words.pack([5, 6, 7, 8, 9, 1, 1], [False, True, True, False, False, False, False],
                     [True, False, False, False, True, True, False]).astype(np.int64)
    spans = [(ids.tolist(), t, s) for ids, t, s in sample_spans(row, eos_id=2, flags=True)]
    assert spans == [([5], False, True), ([6, 7], True, False), ([8], False, False), ([9], False, True),
                     ([1, 1], False, True)]


def test_plain_rows_are_all_trained_with_a_document_after_each_eos():
    row = np.array([4, 5, 2, 6, 7, 2, 2, 8], np.uint16)
    assert words.document_starts(row, 2).astype(int).tolist() == [0, 0, 0, 1, 0, 0, 1, 1]
    spans = [(ids.tolist(), t, s) for ids, t, s in sample_spans(row.astype(np.int64), eos_id=2, flags=False)]
    assert spans == [([4, 5, 2], True, False), ([6, 7, 2], True, True), ([2], True, True), ([8], True, True)]
    assert not words.document_starts(row, None).any()
