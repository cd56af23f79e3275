"""`bigtrain plot`: training curves of one or more run directories in one PNG.

    plot_runs(["runs/a", "runs/b"], "curves.png", x="step")    # or x="tokens"

Each run's `metrics.jsonl` (one JSON object per optimizer step) gives the panels: training loss, validation
perplexity (one panel per validation set: every `val/<name>/ppl` key, or exp(`val/<name>/loss`); a run with
neither falls back to exp(`val_loss`) as the set "val"), learning rate and tokens/s. Runs are overlaid and
labelled with their directory names. Against tokens, cumulative tokens = step x train.global_batch_size x
model.seq_length from the run's config.yaml. Torn or malformed lines (a run killed mid-write) are skipped and
counted in a warning; a later record of the same step (a resumed run) replaces an earlier one. Drawn with
matplotlib's Agg canvas (no display needed) and written atomically.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re

from ..atomic import atomic_path
from ..errors import BigtrainError

log = logging.getLogger("bigtrain")

VAL_KEY = re.compile(r"^val/(.+)/(ppl|loss)$")
FALLBACK_SET = "val"


def read_metrics(run_dir: str) -> list[dict]:
    """The run's step records, sorted by step, one per step (the last one written wins)."""
    if not os.path.isdir(run_dir):
        raise BigtrainError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise BigtrainError(f"{path}: no metrics (not a run directory, or the run has not finished a step)")
    records, bad = {}, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                step = r["step"]
                if not isinstance(r, dict) or not isinstance(step, int) or isinstance(step, bool):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            records[step] = r
    if bad:
        log.warning(f"{path}: skipped {bad} malformed line{'s' if bad > 1 else ''}")
    if not records:
        raise BigtrainError(f"{path}: no step records")
    return [records[s] for s in sorted(records)]


def _number(v) -> float | None:
    """A plottable value: None for anything but a number, NaN (a gap in the line) for inf and NaN."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else math.nan


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a number under `key` (non-finite ones as NaN: gaps)."""
    steps, values = [], []
    for r in records:
        v = _number(r.get(key))
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _exp(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.nan


def perplexities(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Validation perplexity per set: `val/<name>/ppl`, else exp(`val/<name>/loss`); exp(`val_loss`) as the set
    'val' when the run has no per-set keys."""
    names = sorted({m.group(1) for r in records for k in r if (m := VAL_KEY.match(k))})
    out = {}
    for name in names:
        steps, values = [], []
        for r in records:
            ppl, loss = _number(r.get(f"val/{name}/ppl")), _number(r.get(f"val/{name}/loss"))
            if ppl is not None or loss is not None:
                steps.append(r["step"])
                values.append(ppl if ppl is not None else _exp(loss))
        out[name] = (steps, values)
    if not names:
        steps, losses = series(records, "val_loss")
        if steps:
            out[FALLBACK_SET] = (steps, [_exp(v) for v in losses])
    return out


def tokens_per_step(run_dir: str) -> int:
    """Tokens in one optimizer step (global batch x sequence length), from the run's config.yaml."""
    import yaml
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        why = "no such file"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = f"unreadable ({type(e).__name__})"
    else:
        def get(section, *keys):
            part = cfg.get(section) if isinstance(cfg, dict) else None
            values = [part.get(k) for k in keys] if isinstance(part, dict) else []
            return next((v for v in values if v is not None), None)
        batch, seq = get("train", "global_batch_size"), get("model", "seq_length", "seq_len")
        if isinstance(batch, int) and isinstance(seq, int) and batch > 0 and seq > 0:
            return batch * seq
        why = "no positive train.global_batch_size and model.seq_length"
    raise BigtrainError(f"{path}: {why}: cannot plot against tokens (use --x step)")


def run_names(run_dirs: list[str]) -> list[str]:
    """Directory base names; the paths as given where two base names collide."""
    base = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [b if base.count(b) == 1 else os.path.normpath(d) for b, d in zip(base, run_dirs)]


def _format_tokens(v: float, _pos=None) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def plot_runs(run_dirs: list[str], out: str, x: str = "step") -> str:
    """Draw the runs' curves into the PNG `out` (written atomically); returns `out`."""
    if x not in ("step", "tokens"):
        raise BigtrainError(f"--x {x!r}: expected 'step' or 'tokens'")
    if not run_dirs:
        raise BigtrainError("no run directory to plot")
    runs = []
    for name, d in zip(run_names(run_dirs), run_dirs):
        records = read_metrics(d)
        scale = tokens_per_step(d) if x == "tokens" else 1
        runs.append((name, records, scale))
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise BigtrainError("matplotlib is not installed: pip install 'bigtrain[eval]'") from None

    sets = sorted({s for _, records, _ in runs for s in perplexities(records)}, key=lambda s: (s != FALLBACK_SET, s))
    panels = [("training loss", "loss", None)]
    panels += [(f"validation perplexity: {s}" if s != FALLBACK_SET else "validation perplexity", None, s)
               for s in sets] or [("validation perplexity", None, "")]
    panels += [("learning rate", "lr", None), ("tokens/s", "tokens_per_s", None)]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    xlabel = "tokens" if x == "tokens" else "step"
    for i, (title, key, val_set) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        drawn = 0
        for (name, records, scale), color in zip(runs, colors):
            if key is not None:
                steps, values = series(records, key)
            else:
                steps, values = perplexities(records).get(val_set, ([], []))
            if not steps:
                continue
            xs = [s * scale for s in steps]
            marker = "o" if key is None or len(steps) <= 20 else None
            label = name
            last = next((v for v in reversed(values) if math.isfinite(v)), None)
            if key in (None, "loss") and last is not None:  # the latest value, to compare runs at a glance
                label += f" ({last:.4g})" if key is None else f" ({last:.3f})"
            ax.plot(xs, values, color=color, label=label, marker=marker, markersize=3, linewidth=1.4)
            drawn += 1
        if key is None:
            ax.set_ylabel("perplexity (log scale)")
            if drawn:
                ax.set_yscale("log")
        elif key == "loss":
            ax.set_ylabel("loss (nats/token)")
        elif key == "lr":
            ax.set_ylabel("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:
            ax.set_ylabel("tokens/s")
            ax.yaxis.set_major_formatter(FuncFormatter(_format_tokens))
            if drawn:
                ax.set_ylim(bottom=0)
        if x == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(_format_tokens))
        if drawn:
            ax.legend(fontsize="small", loc="best")
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.suptitle(", ".join(name for name, _, _ in runs))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out
