"""`bigtrain plot`: synthetic run directories shaped like real ones (metrics.jsonl with the trainer's keys and a
torn last line, config.yaml) drawn into a real PNG; the one-line errors."""
import json
import logging
import math
import os

import pytest
from PIL import Image

from bigtrain.errors import BigtrainError
from bigtrain.eval.plot import perplexities, plot_runs, read_metrics, tokens_per_step


def _run(root, name, steps=60, eval_every=10, per_set=False, torn=False, lr=3e-3, batch=16, seq=256):
    d = root / name
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            warm = min(1.0, step / 10)
            r = {"step": step, "batch": step - 1, "loss": 9.0 * math.exp(-step / 25) + 3.0 + 0.05 * math.sin(step),
                 "lr": lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / steps)), "grad_norm": 1.0 / warm,
                 "skipped_steps": 0, "tokens_per_s": 20000 + 500 * math.sin(step / 3), "tflops_per_device": 0.1,
                 "mfu": 0.01, "mem_gib": 1.2, "step_seconds": 0.2}
            if step == 7:  # a skipped step (non-finite loss): a gap in the line
                r.update(loss=float("nan"), skipped_steps=1)
            if step % eval_every == 0:
                loss = 9.2 * math.exp(-step / 25) + 3.2
                if per_set:
                    r.update({"val/web/loss": loss, "val/web/ppl": math.exp(loss),
                              "val/code/loss": loss - 0.8, "val/code/ppl": math.exp(loss - 0.8)})
                else:
                    r["val_loss"] = loss
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"step": 61, "loss": 3.1, "lr"')  # killed mid-write
    (d / "config.yaml").write_text(f"model:\n  seq_length: {seq}\n  hidden_size: 256\n"
                                   f"train:\n  global_batch_size: {batch}\n  steps: {steps}\n")
    return str(d)


def _check_png(path, min_colors=50):
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] >= 800 and img.size[1] >= 600, img.size
    colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) >= min_colors, len(colors or [])


def test_two_runs_overlaid_against_step_and_tokens(tmp_path, caplog):
    a = _run(tmp_path, "baseline", torn=True)
    b = _run(tmp_path, "per-set", per_set=True, lr=1e-3, batch=32)
    out = str(tmp_path / "out" / "curves.png")
    with caplog.at_level(logging.WARNING, logger="bigtrain"):
        assert plot_runs([a, b], out) == out
    assert any("skipped 1 malformed line" in r.getMessage() and "baseline" in r.getMessage() for r in caplog.records)
    _check_png(out)
    assert [f for f in os.listdir(tmp_path / "out")] == ["curves.png"]  # written aside and renamed
    out_tokens = str(tmp_path / "tokens.png")
    plot_runs([a, b], out_tokens, x="tokens")
    _check_png(out_tokens)


def test_series_read_from_the_records(tmp_path):
    a = _run(tmp_path, "a", torn=True)
    records = read_metrics(a)
    assert [r["step"] for r in records] == list(range(1, 61))
    ppl = perplexities(records)
    assert list(ppl) == ["val"] and ppl["val"][0] == [10, 20, 30, 40, 50, 60]
    assert ppl["val"][1][0] == pytest.approx(math.exp(records[9]["val_loss"]))
    assert math.isnan(records[6]["loss"])
    b = perplexities(read_metrics(_run(tmp_path, "b", per_set=True)))
    assert sorted(b) == ["code", "web"] and len(b["web"][0]) == 6
    assert tokens_per_step(a) == 16 * 256


def test_a_resumed_run_keeps_the_last_record_of_a_step(tmp_path):
    d = _run(tmp_path, "r", steps=5)
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 1.0}) + "\n")
        f.write("\n[1, 2]\n" + json.dumps({"loss": 2.0}) + "\n")
    records = read_metrics(d)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[2]["loss"] == 1.5


def test_errors_are_one_line_and_name_the_path(tmp_path):
    out = str(tmp_path / "c.png")
    missing = str(tmp_path / "nope")
    with pytest.raises(BigtrainError, match=f"^{missing}: no such run directory$"):
        plot_runs([missing], out)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BigtrainError, match="empty_dir/metrics.jsonl: no metrics"):
        plot_runs([str(tmp_path / "empty_dir")], out)
    d = tmp_path / "empty"
    d.mkdir()
    (d / "metrics.jsonl").write_text("")
    with pytest.raises(BigtrainError, match="empty/metrics.jsonl: no step records"):
        plot_runs([str(d)], out)
    (d / "metrics.jsonl").write_text('{"step": 1, "loss"\n')
    with pytest.raises(BigtrainError, match="no step records"):
        plot_runs([str(d)], out)
    good = _run(tmp_path, "good")
    os.remove(os.path.join(good, "config.yaml"))
    with pytest.raises(BigtrainError, match="good/config.yaml: no such file: cannot plot against tokens"):
        plot_runs([good], out, x="tokens")
    with open(os.path.join(good, "config.yaml"), "w") as f:
        f.write("model: {hidden_size: 64}\ntrain: {steps: 3}\n")
    with pytest.raises(BigtrainError, match="good/config.yaml: no positive"):
        plot_runs([good], out, x="tokens")
    plot_runs([good], out)  # against steps the config is not needed
    _check_png(out)


def test_cli_plot(tmp_path, capsys):
    from bigtrain.cli import main
    a = _run(tmp_path, "cli-run")
    out = str(tmp_path / "cli.png")
    main(["plot", a, "-o", out, "--x", "tokens"])
    assert capsys.readouterr().out.strip() == out
    _check_png(out)
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path / "missing"), "-o", out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bigtrain: error: ") and "missing" in err
