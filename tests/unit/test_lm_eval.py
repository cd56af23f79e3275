"""`bigtrain lm-eval`: lm-evaluation-harness, offline, on a real tiny run (exported to HF on the fly) and on an
exported HF directory, through the real command line; the one-line errors."""
import json
import math
import os
import subprocess
import sys

import pytest

import helpers
from bigtrain.config import load_config
from bigtrain.errors import BigtrainError


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    from bigtrain.train import train
    run = str(tmp_path_factory.mktemp("lm_eval") / "run")
    train(load_config(None, helpers.tiny(data, run, "train.steps=3")))
    return run


def offline_env(tmp_path) -> dict:
    """No network: offline flags set, an empty HF cache, and proxies that lead nowhere (any download fails)."""
    env = helpers.clean_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    for k in list(env):
        if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            del env[k]
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return env


def lm_eval_cli(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "lm-eval", *args], env=offline_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout)


def test_shipped_tasks_on_a_run_directory(run, tmp_path):
    out = str(tmp_path / "results" / "lm_eval.json")
    result = lm_eval_cli(tmp_path, run, "--output", out)
    assert result["checkpoint"].startswith(os.path.join(run, "checkpoints"))
    mc, text = result["tasks"]["bigtrain_mc"], result["tasks"]["bigtrain_text"]
    assert 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1 and mc["samples"] == 42, mc
    assert math.isfinite(text["word_perplexity"]) and text["word_perplexity"] > 1, text
    assert math.isfinite(text["byte_perplexity"]) and text["byte_perplexity"] > 1 and text["bits_per_byte"] > 0, text
    assert text["samples"] == 4
    with open(out) as f:
        assert json.load(f) == result


def test_exported_hf_directory_with_task_choice_and_limit(run, tmp_path, capsys):
    """In this process (the offline run above already went through a subprocess): SRC an HF directory."""
    from bigtrain.cli import main
    from bigtrain.convert import to_hf
    hf = str(tmp_path / "hf")
    to_hf(run, hf)
    capsys.readouterr()
    main(["lm-eval", hf, "--tasks", "bigtrain_mc", "--limit", "5"])
    result = json.loads(capsys.readouterr().out)
    assert list(result["tasks"]) == ["bigtrain_mc"] and result["checkpoint"] is None
    assert result["tasks"]["bigtrain_mc"]["samples"] == 5 and 0 <= result["tasks"]["bigtrain_mc"]["acc"] <= 1


def test_errors(tmp_path, monkeypatch):
    from bigtrain.eval import harness
    with pytest.raises(BigtrainError, match="nope: no such run, checkpoint or Hugging Face directory"):
        harness.lm_eval_run(str(tmp_path / "nope"))
    with pytest.raises(BigtrainError, match="--limit 0"):
        harness.lm_eval_run(str(tmp_path), limit=0)
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BigtrainError, match=r"^lm-eval is not installed: pip install 'bigtrain\[eval\]'$"):
        harness.lm_eval_run(str(tmp_path))


def test_task_templates_get_absolute_paths(tmp_path):
    import yaml
    from bigtrain.eval.harness import SHIPPED, write_task_yamls
    written = write_task_yamls(str(tmp_path))
    tasks = {}
    for path in written:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        tasks[cfg["task"]] = cfg
        data_file = cfg["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data_file) and os.path.isfile(data_file), data_file
    assert sorted(tasks) == sorted(SHIPPED)
    with open(tasks["bigtrain_mc"]["dataset_kwargs"]["data_files"]["test"]) as f:
        questions = [json.loads(line) for line in f]
    assert len(questions) >= 40
    assert all(len(q["choices"]) == 4 and 0 <= q["label"] < 4 and len(set(q["choices"])) == 4 for q in questions)
