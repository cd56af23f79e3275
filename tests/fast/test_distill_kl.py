"""The KD term as pure functions: the KL against torch's kl_div (values and gradients, one process), and the
teacher/student compatibility checks."""
import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import load_config
from bigtrain.distill import check_compatible, vocab_parallel_kl
from bigtrain.errors import BigtrainError


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_equals_kl_div(T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 40, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    w = torch.rand(3, 5, generator=g, dtype=torch.float64)
    ours = vocab_parallel_kl(s, t, T)
    ref_s = s.detach().clone().requires_grad_()
    ref = F.kl_div(F.log_softmax(ref_s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(s.grad, ref_s.grad, atol=1e-6)
    assert vocab_parallel_kl(t, t, T).abs().max() < 1e-6


def _tokenizer(path, words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(str(path))
    return str(path)


def test_compatibility_checks_name_both_sides(tmp_path):
    a = _tokenizer(tmp_path / "a.json", ["<unk>", "x", "y"])
    b = _tokenizer(tmp_path / "b.json", ["<unk>", "y", "x"])
    student = load_config(None, ["model.vocab_size=3", f"data.tokenizer={a}"])
    check_compatible(student, load_config(None, ["model.vocab_size=3", f"data.tokenizer={a}"]), "T")
    with pytest.raises(BigtrainError, match=r"tokenizer .*b\.json.*student uses data\.tokenizer .*a\.json"):
        check_compatible(student, load_config(None, ["model.vocab_size=3", f"data.tokenizer={b}"]), "T")
    with pytest.raises(BigtrainError, match=r"vocabulary 5 \(padded 128\).*model\.vocab_size 3"):
        check_compatible(student, load_config(None, ["model.vocab_size=5", "model.vocab_pad_multiple=128"]), "T")
    with pytest.raises(BigtrainError, match="seq_length"):
        check_compatible(student, load_config(None, ["model.vocab_size=3", "model.seq_length=16"]), "T")
