"""Built-in corpus recipes (`data.prepare`): real text that needs no download, tokenized on first use.

`stdlib`: the Python standard library's own sources (about 1,700 files, 9M tokens with an 8k vocabulary),
on every machine that runs bigtrain. `idlelib` is held out for validation. The tokenizer and shards are
written to the paths the config names (data.tokenizer, data.sources[0].path, data.validation) if they are
not there yet; a run that finds them complete reuses them.
"""
from __future__ import annotations

import logging
import os
import sysconfig

from ..atomic import atomic_dir
from ..errors import BigtrainError
from .shards import MANIFEST, write_shards
from .tokenizer import train_tokenizer

log = logging.getLogger("bigtrain")

RECIPES = ("stdlib",)


def stdlib_inputs(validation: bool) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    if validation:
        return [f"{root}/idlelib/**/*.py"]
    # under pyenv/venv-less installs site-packages lives inside the stdlib directory
    return [f"{root}/**/*.py", f"exclude:{root}/site-packages/**", f"exclude:{root}/dist-packages/**",
            f"exclude:{root}/idlelib/**"]


def prepare(cfg) -> None:
    """Build what `cfg.data.prepare` names, where the config expects it, unless it is already there."""
    recipe, d = cfg.data.prepare, cfg.data
    if recipe not in RECIPES:
        raise BigtrainError(f"config key 'data.prepare': unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    if not d.tokenizer.endswith(".model") or len(d.sources) != 1:
        raise BigtrainError("config key 'data.prepare': the stdlib recipe needs data.tokenizer=PREFIX.model and "
                            "exactly one data.sources entry")
    if not os.path.exists(d.tokenizer):
        log.info(f"data.prepare={recipe}: training a {cfg.model.vocab_size}-token tokenizer -> {d.tokenizer}")
        # the .model file is written last and atomically: its presence means the tokenizer is complete
        train_tokenizer(stdlib_inputs(False), cfg.model.vocab_size, d.tokenizer.removesuffix(".model"))
    held_out = d.validation_sets()[:1]  # the recipe's held-out set goes to the first validation path
    for out, validation in ((d.sources[0].path, False), *((path, True) for _, path in held_out)):
        if not out or os.path.exists(os.path.join(out, MANIFEST)):
            continue
        if os.path.exists(out):
            raise BigtrainError(f"data.prepare={recipe}: {out} exists but holds no {MANIFEST}: choose another path "
                                "or delete it")
        log.info(f"data.prepare={recipe}: writing {'validation' if validation else 'training'} shards -> {out}")
        with atomic_dir(out) as tmp:  # an interrupted preparation leaves nothing at `out`
            write_shards(tokenizer=d.tokenizer, inputs=stdlib_inputs(validation), output=tmp,
                         seq_len=cfg.model.seq_length, shard_samples=256 if validation else 1024)
