"""Every config in configs/ loads (with its own checks), its layout fits the GPUs its header states (`# gpus: N`,
and `# gpu-mem-gib: M` when given: the plan's heaviest rank fits), and the real models' parameter counts match
the published figures. The counts compared are the published ones: the tokenizer's vocabulary, not bigtrain's
padded embedding (equal for these vocabularies, which are multiples of 128)."""
import glob
import os
import re

import pytest

from bigtrain.config import load_config
from bigtrain.parallel.plan import GIB, configured_layout, param_count, rank_memory, refusal, worst

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
PATHS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))

PUBLISHED = {  # parameters, from each model's architecture (HF config.json) and model card
    "tinyllama-1.1b.yaml": 1_100_048_384,
    "llama3-8b.yaml": 8_030_261_248,
    "llama3-70b.yaml": 70_553_706_496,
    "smollm2-135m.yaml": 134_515_008,
    "smollm2-360m.yaml": 361_821_120,
    "smollm2-1.7b.yaml": 1_711_376_384,
}


def header(path: str, key: str) -> str | None:
    """The value of a `# key: value` line of the config's header comment."""
    with open(path) as f:
        m = re.search(rf"^# {re.escape(key)}: *(\S+) *$", f.read(), re.M)
    return m.group(1) if m else None


def test_every_real_model_has_a_config():
    assert set(PUBLISHED) <= {os.path.basename(p) for p in PATHS}


@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_config_loads_and_its_layout_fits_its_gpus(path):
    cfg = load_config(path)  # runs the config's own checks
    gpus = header(path, "gpus")
    assert gpus and gpus.isdigit(), f"{path}: no '# gpus: N' header line"
    gpus = int(gpus)
    p = cfg.parallel
    assert gpus % (p.tensor * p.pipeline) == 0, (gpus, p.tensor, p.pipeline)
    lay = configured_layout(cfg, gpus)
    assert refusal(cfg, lay, gpus, gpus_per_node=8) is None
    mem = header(path, "gpu-mem-gib")
    if mem is not None:
        heaviest = worst(rank_memory(cfg, lay))
        assert heaviest.total <= float(mem) * GIB, (path, heaviest.total / GIB)


@pytest.mark.parametrize("name, published", sorted(PUBLISHED.items()))
def test_parameter_count_matches_the_published_figure(name, published):
    m = load_config(os.path.join(CONFIGS, name)).model
    assert abs(param_count(m) - published) <= 1e-3 * published, (param_count(m), published)
    assert param_count(m, padded=True) >= param_count(m)
