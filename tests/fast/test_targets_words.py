"""Token words (data/words.py) and what the trainer derives from them (data/targets.py): pure functions."""
import numpy as np
import pytest
import torch

from bigtrain.config import load_config
from bigtrain.data.words import DOC_START, NOT_TRAINED, document_starts, pack, unpack, with_source
from bigtrain.errors import BigtrainError
from bigtrain.data.targets import document_mask, document_positions, microbatches


def test_words_round_trip_and_sources():
    ids = np.array([5, 7, 2, 9])
    w = pack(ids, [True, False, True, True], [True, False, False, True])
    assert w.dtype == np.uint32 and w[1] & NOT_TRAINED and w[3] & DOC_START
    rows = with_source(w[None].repeat(2, 0), np.array([0, 3]))
    got_ids, trained, starts, source = unpack(torch.from_numpy(rows))
    assert got_ids.tolist() == [ids.tolist()] * 2 and trained[0].tolist() == [True, False, True, True]
    assert starts[1].tolist() == [True, False, False, True] and source[:, 0].tolist() == [0, 3]
    assert unpack(np.array([3, 4], np.uint16))[0].tolist() == [3, 4]  # narrow dtypes too
    with pytest.raises(ValueError):
        pack([1 << 30])


def test_document_positions_and_mask():
    starts = torch.tensor([[True, False, False, True, False, True]])
    seg, pos = document_positions(starts)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]] and seg.tolist() == [[1, 1, 1, 2, 2, 3]]
    blocked = document_mask(seg)[0, 0]
    allowed = [[int(not b) for b in row] for row in blocked.tolist()]
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert document_starts(torch.tensor([[4, 2, 5, 2, 6]]), eos_id=2).tolist() == [[False, False, True, False, True]]
    # a row with DOC_START flags (chat: EOS may end every turn) keeps exactly its flags; a row without uses EOS
    ids = torch.tensor([[4, 2, 5, 2, 6], [4, 2, 5, 2, 6]])
    flagged = torch.tensor([[True, False, False, False, False], [False] * 5])
    assert document_starts(ids, 2, flagged).tolist() == [[True, False, False, False, False],
                                                         [False, False, True, False, True]]


def test_label_weights_masks_documents_and_loss_weights():
    cfg = load_config(None, ["data.sources=[{path: a}, {path: b, loss_weight: 0.25}]", "train.micro_batch_size=1",
                             "data.document_masking=true"])
    ids = np.arange(10, 16)
    rows = np.stack([pack(ids, [1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0])] * 2)
    mbs = microbatches(torch.from_numpy(with_source(rows, np.array([0, 1]))), cfg)
    # labels are tokens 1..5: token 2 not trained, token 3 starts a document (not predicted across the boundary)
    assert mbs[0].weights.tolist() == [[1, 0, 0, 1, 1]] and mbs[1].weights.tolist() == [[0.25, 0, 0, 0.25, 0.25]]
    assert mbs[0].per_microbatch == pytest.approx(3.75 / 2)
    assert mbs[0].positions.tolist() == [[0, 1, 2, 0, 1]]
    cfg.data.document_masking = False
    assert microbatches(torch.from_numpy(rows.astype(np.int64)), cfg)[0].positions is None


def test_loss_weight_must_be_finite_and_not_negative():
    with pytest.raises(BigtrainError, match=r"data.sources\[0\].loss_weight': expected a finite number >= 0, got -1"):
        load_config(None, ["data.sources=[{path: a, loss_weight: -1}]"])


def test_flex_attention_path_equals_the_masked_sdpa_path():
    """The GPU path for packed documents (FlexAttention with a block mask) gives the masked SDPA path's output:
    checked here in eager mode (forward; FlexAttention has no CPU backward), grouped-query heads included."""
    import warnings
    import torch.nn.functional as F
    from bigtrain.model.gpt import flex_attend
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 32, 16, generator=g)
    k, v = torch.randn(2, 2, 32, 16, generator=g), torch.randn(2, 2, 32, 16, generator=g)
    starts = torch.zeros(2, 32, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, [9, 20]] = True
    blocked = document_mask(document_positions(starts)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex_attend(q, k, v, blocked)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked, enable_gqa=True)
    assert (got - want).abs().max() < 1e-5
