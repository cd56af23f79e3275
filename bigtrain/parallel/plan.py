"""`bigtrain plan`: how a config's model and training state split over GPUs, and which layouts fit.

Pure arithmetic on the config (no torch): the parameter count, each rank's parameters (its TP shard of its
pipeline stage: the embedding on the first stage, the final norm and output layer on the last, a tied
embedding's second copy there too when PP > 1), the *state bytes* DeepSpeed holds for them, an activation
estimate, and every TP x PP x ZeRO layout for a number of GPUs, feasible or refused with a one-line reason.

State bytes are what each rank's engine holds at the optimizer step (gradients reduced, AdamW about to run: the
peak of the state) -- model parameters in the training precision, every gradient buffer, fp32 master weights and
AdamW's two moments -- counted per element once (views of one flat buffer are not counted twice). DeepSpeed
0.19's engines hold, per parameter of the rank (n) and per parameter of its data-parallel partition (n/DP):

| engine (bigtrain's config)            | parameters | gradients              | optimizer (master + 2 moments) |
|---------------------------------------|------------|------------------------|--------------------------------|
| torch AdamW (ZeRO-0, fp32)            | 4 n        | 4 n                    | 8 n (no separate master)       |
| ZeRO-1/2, fp32; ZeRO-2, bf16          | p n        | 4 n/DP (fp32 partition)| 12 n/DP                        |
| ZeRO-1, bf16 (DeepSpeed's bf16 opt.)  | 2 n        | 2 n bf16 + 4 n fp32    | 12 n/DP                        |
| ZeRO-3                                | p n/DP     | (p + 4) n/DP           | 12 n/DP                        |

(p: 2 bytes in bf16, 4 in fp32.) ZeRO-1/2 free each reduced gradient once it is in the fp32 partition, so
the moment before the update holds the partition only (the flattening inside the step briefly holds a second
copy of its largest parameter group: not counted).

Not counted: communication buckets (`reduce_bucket_size` elements, a fixed size), the scalars of AdamW, the CUDA
context and allocator slack. Measured against real CPU runs in tests/unit/test_plan_memory.py and
tests/dist/test_plan_memory.py (tools/plan_vs_measured.py prints the figures).

Activations are an estimate (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models"): per layer and microbatch s*b*h*(34/t + 5*a*s/(h*t)) bytes in 16-bit with sequence parallelism,
s*b*h*(10 + 24/t + 5*a*s/(h*t)) without; `selective` recompute drops the attention-score term 5*a*s/h, which
SDPA's fused kernels never store either (model.attention=sdpa); `full` keeps each layer's input only (2*s*b*h,
/t with sequence parallelism or parallel.partition_activations, none on the GPU with parallel.offload_activations;
plus one whole layer, recomputed in backward). fp32 doubles them. The first pipeline
stage holds min(PP, microbatches) microbatches in flight (1F1B); the last holds the fp32 logits of one microbatch
(4*s*b*V/t).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import Config, ConfigError, ModelConfig, ffn_size, kv_heads, padded_vocab
from ..config.load import check

GIB = 2**30


# --- parameters ---------------------------------------------------------------------------------------------

def layer_params(m: ModelConfig, tensor: int = 1) -> int:
    """Parameters of one transformer block on one of `tensor` TP ranks (the norms are replicated)."""
    d, hd = m.hidden_size, m.hidden_size // m.num_attention_heads
    attention = d * hd * (2 * m.num_attention_heads + 2 * kv_heads(m))  # q, o; k, v
    return (attention + 3 * d * ffn_size(m)) // tensor + 2 * d


def param_count(m: ModelConfig, padded: bool = False) -> int:
    """Parameters of the whole model: the published figure with the tokenizer's vocabulary (`padded` False), or
    as bigtrain holds it, the embedding rounded up to model.vocab_pad_multiple rows (`padded` True; what
    bigtrain.train.metrics.num_params counts)."""
    vocab = padded_vocab(m) if padded else m.vocab_size
    return m.num_layers * layer_params(m) + m.hidden_size + vocab * m.hidden_size * (1 if m.tie_embeddings else 2)


def stage_params(m: ModelConfig, tensor: int, pipeline: int, stage: int) -> int:
    """Parameters held by one TP rank of pipeline stage `stage` (0-based)."""
    n = m.num_layers // pipeline * layer_params(m, tensor)
    table = padded_vocab(m) * m.hidden_size // tensor
    if stage == 0:
        n += table
    if stage == pipeline - 1:
        n += m.hidden_size + (table if pipeline > 1 or not m.tie_embeddings else 0)
    return n


# --- bytes per rank -----------------------------------------------------------------------------------------

@dataclass
class State:
    """Bytes one rank's engine holds at the optimizer step (see the module docstring)."""
    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def state_bytes(n: int, dp: int, zero_stage: int, precision: str) -> State:
    """State bytes of a rank holding `n` parameters, data-parallel size `dp`, under DeepSpeed's engine for this
    ZeRO stage and precision."""
    part = math.ceil(n / dp)
    width = 2 if precision == "bf16" else 4
    optimizer = 12 * part
    if zero_stage == 0:
        return State(4 * n, 4 * n, 8 * n)
    if zero_stage == 3:
        return State(width * part, (width + 4) * part, optimizer)
    if zero_stage == 1 and precision == "bf16":  # DeepSpeed's bf16 optimizer: whole gradients, bf16 and fp32
        return State(2 * n, 6 * n, optimizer)
    return State(width * n, 4 * part, optimizer)


def microbatches(cfg: Config, dp: int) -> int:
    return max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp))


def activation_bytes(cfg: Config, tensor: int, pipeline: int, dp: int, stage: int, sequence_parallel: bool) -> int:
    """Estimated activation memory of one rank of pipeline stage `stage` (see the module docstring)."""
    m, p = cfg.model, cfg.parallel
    s, b, h, a, t = m.seq_length, cfg.train.micro_batch_size, m.hidden_size, m.num_attention_heads, tensor
    sbh = s * b * h
    base = 34 / t if sequence_parallel else 10 + 24 / t
    scores = 5 * a * s / (h * t) if p.activation_checkpointing == "none" and m.attention == "unfused" else 0
    whole_layer = sbh * (base + scores)
    per_layer = 2 * sbh / (t if sequence_parallel or p.partition_activations else 1) \
        if p.activation_checkpointing == "full" else whole_layer
    if p.activation_checkpointing == "full" and p.offload_activations:
        per_layer = 0  # the checkpointed layer inputs live in host memory
    in_flight = min(pipeline - stage, microbatches(cfg, dp))
    total = per_layer * m.num_layers // pipeline * in_flight
    if p.activation_checkpointing == "full":
        total += whole_layer  # the layer being recomputed in backward
    if cfg.train.precision == "fp32":
        total *= 2
    if stage == pipeline - 1:
        total += 4 * s * b * padded_vocab(m) / t
    return int(total)


@dataclass
class Layout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    sequence_parallel: bool = False

    @property
    def name(self) -> str:
        return f"TP{self.tensor} PP{self.pipeline} DP{self.data} ZeRO-{self.zero_stage}"


@dataclass
class RankMemory:
    """One rank's figures: the heaviest rank of `stage` (first, last, middle, or the only one)."""
    stage: str
    parameters: int              # parameter count on this rank
    state: State
    activations: int             # estimate

    @property
    def total(self) -> int:
        return self.state.total + self.activations


def rank_memory(cfg: Config, lay: Layout) -> list[RankMemory]:
    """Per-rank figures of each distinct pipeline stage (first, middle, last; one when PP is 1)."""
    stages = sorted({0, lay.pipeline - 1, *([1] if lay.pipeline > 2 else [])})
    out = []
    for st in stages:
        label = "only" if lay.pipeline == 1 else "first" if st == 0 else "last" if st == lay.pipeline - 1 else "middle"
        n = stage_params(cfg.model, lay.tensor, lay.pipeline, st)
        out.append(RankMemory(label, n, state_bytes(n, lay.data, lay.zero_stage, cfg.train.precision),
                              activation_bytes(cfg, lay.tensor, lay.pipeline, lay.data, st, lay.sequence_parallel)))
    return out


def worst(ranks: list[RankMemory]) -> RankMemory:
    return max(ranks, key=lambda r: r.total)


# --- layouts ------------------------------------------------------------------------------------------------

def configured_layout(cfg: Config, gpus: int) -> Layout:
    p = cfg.parallel
    return Layout(p.tensor, p.pipeline, max(1, gpus // (p.tensor * p.pipeline)), p.zero_stage, p.sequence_parallel)


def with_layout(cfg: Config, lay: Layout) -> Config:
    par = dataclasses.replace(cfg.parallel, tensor=lay.tensor, pipeline=lay.pipeline, zero_stage=lay.zero_stage,
                              sequence_parallel=lay.sequence_parallel)
    return dataclasses.replace(cfg, parallel=par)


def refusal(cfg: Config, lay: Layout, gpus: int, gpus_per_node: int) -> str | None:
    """Why this layout cannot run the config on `gpus` GPUs (the config's own checks and the start-up layout checks
    of bigtrain.parallel.engine, one line), or None."""
    if lay.tensor > gpus_per_node:
        return f"TP={lay.tensor} spans nodes ({gpus_per_node} GPUs per node): tensor parallelism stays inside a node"
    try:
        c = with_layout(cfg, lay)
        check(c)
        check_layout(c, gpus)
    except ConfigError as e:
        return str(e)
    return None


ZERO_PREFERENCE = (1, 0, 2, 3)
"""ZeRO stages from most to least preferred: ZeRO-1's reduce-scatter + all-gather move what ZeRO-0's all-reduce
moves, with less memory; ZeRO-2 adds per-bucket reductions, ZeRO-3 gathers the parameters at every use."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Candidate:
    layout: Layout
    reason: str | None           # why it cannot run; None when it can
    worst: RankMemory | None     # its heaviest rank, when the config allows the layout


def candidates(cfg: Config, gpus: int, gpu_mem_gib: float, gpus_per_node: int = 8) -> list[Candidate]:
    """Every TP x PP x ZeRO layout of `gpus` GPUs: feasible ones first, ranked by least model parallelism (TP x PP),
    then least pipeline parallelism, then ZERO_PREFERENCE, then per-rank memory; then the refused ones, each with its
    reason."""
    out = []
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            for zero in range(4):
                lay = Layout(tp, pp, gpus // (tp * pp), zero, cfg.parallel.sequence_parallel and tp > 1)
                reason = refusal(cfg, lay, gpus, gpus_per_node)
                w = None if reason else worst(rank_memory(cfg, lay))
                if w is not None and w.total > gpu_mem_gib * GIB:
                    reason = (f"needs {w.total / GIB:.1f} GiB per GPU ({w.stage} stage) > {gpu_mem_gib:g} GiB")
                out.append(Candidate(lay, reason, w))
    return sorted(out, key=lambda c: (c.reason is not None, c.layout.tensor * c.layout.pipeline, c.layout.pipeline,
                                      ZERO_PREFERENCE.index(c.layout.zero_stage), c.worst.total if c.worst else 0))


def check_layout(cfg: Config, world: int) -> None:
    """Refuse layouts that don't fit the world size or aren't supported, naming the combination (ConfigError)."""
    p, t = cfg.parallel, cfg.train
    mp = p.tensor * p.pipeline
    if world % mp:
        raise ConfigError(f"parallel.tensor={p.tensor} x parallel.pipeline={p.pipeline} = {mp} does not divide "
                          f"the {world} ranks of this job")
    dp = world // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"config key 'train.global_batch_size': {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}")
    if ffn_size(cfg.model) % p.tensor:
        raise ConfigError(f"config key 'parallel.tensor': {p.tensor} must divide the SwiGLU size {ffn_size(cfg.model)} "
                          "(model.ffn_hidden_size)")
    if padded_vocab(cfg.model) % p.tensor:
        raise ConfigError(f"config key 'model.vocab_pad_multiple': the padded vocabulary "
                          f"{padded_vocab(cfg.model)} must be divisible by parallel.tensor={p.tensor}")
    if p.zero_stage == 0 and t.precision == "bf16":
        raise ConfigError("unsupported: parallel.zero_stage=0 with train.precision=bf16 (DeepSpeed would accumulate "
                          "gradients in bf16); use zero_stage=1, which keeps fp32 gradients and costs nothing extra")
    if p.pipeline > 1 and p.zero_stage == 3:
        raise ConfigError("unsupported: parallel.zero_stage=3 with parallel.pipeline > 1 (DeepSpeed ZeRO-3 "
                          "cannot gather parameters across megatron's pipeline schedule); use zero_stage 0-2 with "
                          "pipeline parallelism, or zero_stage=3 with tensor/data parallelism")
    if p.pipeline > 1 and p.zero_stage == 2 and cfg.model.tie_embeddings:
        raise ConfigError("unsupported: parallel.zero_stage=2 with parallel.pipeline > 1 and "
                          "model.tie_embeddings=true (the two stages' copies of the embedding cannot be "
                          "reduced once ZeRO-2 has partitioned their gradients); use zero_stage 0/1 or untied embeddings")


# --- the report ---------------------------------------------------------------------------------------------

def report(cfg: Config, gpus: int, gpu_mem_gib: float, gpus_per_node: int = 8) -> dict:
    """Everything `bigtrain plan` prints, as plain data (its --json output)."""
    m, lay = cfg.model, configured_layout(cfg, gpus)
    ranks = rank_memory(cfg, lay)
    return {
        "parameters": param_count(m), "parameters_padded_vocab": param_count(m, padded=True),
        "gpus": gpus, "gpu_mem_gib": gpu_mem_gib, "precision": cfg.train.precision,
        "activation_checkpointing": cfg.parallel.activation_checkpointing + "".join(
            f" + {k.split('_')[0]}ed" for k in ("partition_activations", "offload_activations")
            if getattr(cfg.parallel, k)),
        "configured": {"layout": dataclasses.asdict(lay), "name": lay.name,
                       "refused": refusal(cfg, lay, gpus, gpus_per_node),
                       "layers_per_stage": m.num_layers // lay.pipeline,
                       "embedding_stage": 0, "output_layer_stage": lay.pipeline - 1,
                       "ranks": [_rank_dict(r) for r in ranks], "worst": worst(ranks).stage},
        "layouts": [{"name": c.layout.name, "layout": dataclasses.asdict(c.layout), "feasible": c.reason is None,
                     "reason": c.reason, "worst": _rank_dict(c.worst) if c.worst else None}
                    for c in candidates(cfg, gpus, gpu_mem_gib, gpus_per_node)],
    }


def _rank_dict(r: RankMemory) -> dict:
    return {"stage": r.stage, "parameters": r.parameters, "parameter_bytes": r.state.parameters,
            "gradient_bytes": r.state.gradients, "optimizer_bytes": r.state.optimizer,
            "state_bytes": r.state.total, "activation_bytes_estimate": r.activations, "total_bytes": r.total}


def _gib(n: int) -> str:
    return f"{n / GIB:7.2f} GiB"


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' if n > 1 else ''}"


def render(rep: dict) -> str:
    """The human-readable `bigtrain plan` output of a `report`."""
    c = rep["configured"]
    lines = [f"model: {rep['parameters']:,} parameters ({rep['parameters_padded_vocab']:,} with the embedding padded "
             "to model.vocab_pad_multiple rows)",
             f"configured layout on {_gpus(rep['gpus'])} of {rep['gpu_mem_gib']:g} GiB: {c['name']}, "
             f"{rep['precision']}, activation checkpointing {rep['activation_checkpointing']}"
             + (f" -- refused: {c['refused']}" if c["refused"] else ""),
             f"  {c['layers_per_stage']} layers per pipeline stage; embedding on stage {c['embedding_stage']}, "
             f"output layer on stage {c['output_layer_stage']}",
             f"  {'stage':8}{'params/rank':>16}{'parameters':>13}{'gradients':>13}{'optimizer':>13}"
             f"{'activations*':>14}{'total':>13}"]
    for r in c["ranks"]:
        lines.append(f"  {r['stage']:8}{r['parameters']:>16,}{_gib(r['parameter_bytes']):>13}"
                     f"{_gib(r['gradient_bytes']):>13}{_gib(r['optimizer_bytes']):>13}"
                     f"{_gib(r['activation_bytes_estimate']):>14}{_gib(r['total_bytes']):>13}")
    lines += [f"  heaviest rank: the {c['worst']} stage. State = parameters + gradients + optimizer state as DeepSpeed "
              "holds them at the optimizer step;",
              "  * activations are an estimate (Korthikanti et al. 2022; communication buffers, CUDA context and "
              "allocator slack not included)",
              f"layouts for {_gpus(rep['gpus'])} (feasible first: least TP x PP, then least PP, "
              "then ZeRO-1, 0, 2, 3):"]
    for i, lay in enumerate(x for x in rep["layouts"] if x["feasible"]):
        w = lay["worst"]
        lines.append(f"  {i + 1:2}. {lay['name']:24} {w['total_bytes'] / GIB:8.2f} GiB per GPU (state "
                     f"{w['state_bytes'] / GIB:.2f} + activations {w['activation_bytes_estimate'] / GIB:.2f}, "
                     f"{w['stage']} stage)")
    if not any(x["feasible"] for x in rep["layouts"]):
        lines.append("  none fits")
    for lay in rep["layouts"]:
        if not lay["feasible"]:
            lines.append(f"   -  {lay['name']:24} {lay['reason'].split('; use ')[0]}")
    return "\n".join(lines)


def plan(config: str | None, overrides: list[str], gpus: int, gpu_mem_gib: float, gpus_per_node: int = 8,
         as_json: bool = False) -> str:
    """`bigtrain plan`: the report for a config file plus overrides, as text or JSON."""
    import json

    from ..config import load_config
    if gpus < 1 or gpu_mem_gib <= 0 or gpus_per_node < 1:
        raise ConfigError(f"bigtrain plan: --gpus ({gpus}) and --gpus-per-node ({gpus_per_node}) must be positive "
                          f"and --gpu-mem-gib ({gpu_mem_gib:g}) above 0")
    rep = report(load_config(config, overrides), gpus, gpu_mem_gib, gpus_per_node)
    return json.dumps(rep, indent=1) if as_json else render(rep)
