"""The exported HF config as transformers 5 reads it: rope theta and the other fields survive the round trip
(transformers 4 would read `rope_parameters` as unknown and fall back to rope_theta 10000, so it is refused)."""
import pytest

from bigtrain.config import ModelConfig
from bigtrain.convert.hf import ConversionError, _check_transformers, hf_config, model_from_hf


@pytest.mark.parametrize("theta", [5e5, 1e6, 12345.0])
def test_rope_theta_survives_export_and_import(theta, tmp_path):
    from transformers import AutoConfig, LlamaConfig
    m = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                    rope_theta=theta, seq_length=128)
    hf_config(m, {}, "float32").save_pretrained(str(tmp_path))
    read = AutoConfig.from_pretrained(str(tmp_path))
    assert isinstance(read, LlamaConfig) and read.rope_parameters["rope_theta"] == theta
    back, _ = model_from_hf(read.to_dict(), str(tmp_path))
    assert back.rope_theta == theta and back.num_kv_heads == 2 and back.vocab_size == 300


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0"])
def test_untested_transformers_is_refused(version, monkeypatch):
    import transformers
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(ConversionError, match=f"transformers {version} is installed"):
        _check_transformers()
