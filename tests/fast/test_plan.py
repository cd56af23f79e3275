"""`bigtrain plan`: parameter counts, state bytes per ZeRO stage and precision, the split over pipeline stages, and
the layouts it ranks or refuses (with reasons); its command line, text and JSON. The state bytes are checked against
real runs in tests/unit/test_plan_memory.py and tests/dist/test_plan_memory.py."""
import json
import os

import pytest

from bigtrain.cli import main
from bigtrain.config import load_config
from bigtrain.parallel.plan import (Layout, State, activation_bytes, candidates, param_count, rank_memory,
                                    stage_params, state_bytes)

TINY_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                         "tiny.yaml")
TINY = ["model.vocab_size=500", "model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=128"]


def test_param_count_counts_the_real_or_the_padded_vocabulary():
    m = load_config(None, TINY).model
    layer = 64 * 16 * (4 + 4 + 2 + 2) + 3 * 64 * 128 + 2 * 64
    assert param_count(m) == 4 * layer + 64 + 2 * 500 * 64
    assert param_count(m, padded=True) == 4 * layer + 64 + 2 * 512 * 64
    tied = load_config(None, [*TINY, "model.tie_embeddings=true"]).model
    assert param_count(tied) == 4 * layer + 64 + 500 * 64


def test_pipeline_stages_hold_embedding_first_and_output_last():
    m = load_config(None, [*TINY, "model.tie_embeddings=true"]).model
    total = param_count(m, padded=True)
    # PP2 with tied embeddings: the last stage holds a second copy of the embedding as its output layer
    assert stage_params(m, 1, 2, 0) + stage_params(m, 1, 2, 1) == total + 512 * 64
    assert stage_params(m, 1, 1, 0) == total
    assert 2 * stage_params(m, 2, 1, 0) == total + 4 * 2 * 64 + 64  # TP2: the norms are on both ranks


@pytest.mark.parametrize("zero, precision, want", [
    (0, "fp32", State(400, 400, 800)),
    (1, "fp32", State(400, 200, 600)),
    (2, "bf16", State(200, 200, 600)),
    (1, "bf16", State(200, 600, 600)),
    (3, "bf16", State(100, 300, 600)),
])
def test_state_bytes_under_each_zero_stage(zero, precision, want):
    assert state_bytes(100, 2, zero, precision) == want


def test_activations_shrink_with_recompute():
    def act(mode):
        cfg = load_config(None, [*TINY, f"parallel.activation_checkpointing={mode}", "model.attention=unfused"])
        return activation_bytes(cfg, 1, 1, 1, 0, False)
    assert act("full") < act("selective") < act("none")


def test_partitioned_and_offloaded_recompute_in_the_plan_and_their_config_checks():
    from bigtrain.errors import BigtrainError
    cfg = load_config(None, ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
                             "parallel.activation_checkpointing=full"])
    full = activation_bytes(cfg, 4, 1, 1, 0, False)
    cfg.parallel.partition_activations = True
    part = activation_bytes(cfg, 4, 1, 1, 0, False)
    cfg.parallel.offload_activations = True
    off = activation_bytes(cfg, 4, 1, 1, 0, False)
    m, b = cfg.model, cfg.train.micro_batch_size
    sbh = m.seq_length * b * m.hidden_size  # 2 * sbh bytes per layer input in bf16
    assert full - part == 2 * sbh * m.num_layers * 3 // 4 and part - off == 2 * sbh * m.num_layers // 4
    for bad, message in ((["parallel.partition_activations=true"], "needs parallel.activation_checkpointing=full"),
                         (["parallel.activation_checkpointing=full", "parallel.offload_activations=true",
                           "model.hidden_dropout=0.1"], "does not replay megatron's dropout"),
                         (["parallel.activation_checkpointing=full", "parallel.partition_activations=true",
                           "parallel.tensor=2", "parallel.sequence_parallel=true"], "already split")):
        with pytest.raises(BigtrainError, match=message):
            load_config(None, bad)


def test_layouts_are_ranked_and_refusals_give_reasons():
    cfg = load_config(None, [*TINY, "train.precision=bf16", "model.num_layers=6"])
    got = {c.layout.name: c for c in candidates(cfg, 4, gpu_mem_gib=80)}
    assert "must divide model.num_layers=6" in got["TP1 PP4 DP1 ZeRO-1"].reason
    assert "zero_stage=3 with parallel.pipeline > 1" in got["TP1 PP2 DP2 ZeRO-3"].reason
    assert "zero_stage=0 with train.precision=bf16" in got["TP1 PP1 DP4 ZeRO-0"].reason
    ranked = candidates(cfg, 4, gpu_mem_gib=80)
    assert ranked[0].layout.name == "TP1 PP1 DP4 ZeRO-1" and ranked[0].reason is None
    small = candidates(cfg, 4, gpu_mem_gib=1e-4)
    assert all(c.reason for c in small) and any("GiB per GPU" in c.reason for c in small)
    heads = candidates(load_config(None, [*TINY, "model.num_kv_heads=4"]), 8, 80, gpus_per_node=8)
    assert "must divide the query heads" in {c.layout.name: c for c in heads}["TP8 PP1 DP1 ZeRO-1"].reason


def test_worst_rank_is_a_first_or_last_stage():
    cfg = load_config(None, [*TINY, "model.num_layers=8", "model.vocab_size=4000"])
    ranks = rank_memory(cfg, Layout(1, 4, 1, 1))
    assert [r.stage for r in ranks] == ["first", "middle", "last"]
    assert max(ranks, key=lambda r: r.total).stage in ("first", "last")


def test_cli_text_json_and_one_line_errors(tmp_path, capsys):
    main(["plan", TINY_YAML, "--gpus", "2", "--gpu-mem-gib", "16", "train.micro_batch_size=4"])
    out = capsys.readouterr().out
    assert out.startswith("model: 5,196,032 parameters") and "TP1 PP1 DP2 ZeRO-1" in out and "estimate" in out
    main(["plan", TINY_YAML, "--gpus", "2", "--gpu-mem-gib", "16", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["parameters"] == 5_196_032 and rep["layouts"][0]["feasible"]
    with pytest.raises(SystemExit) as e:
        main(["plan", TINY_YAML, "--gpus", "2", "--gpu-mem-gib", "16", "parallel.tensor=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigtrain: error: config key 'parallel.tensor': 3") and "\n" not in err
