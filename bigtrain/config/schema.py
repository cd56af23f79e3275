"""The one typed config tree. Each field's docstring (the string under it) is its documentation:
`bigtrain config` prints them next to the resolved values.

YAML files in `configs/` fill this tree; `key=value` overrides on the command line (dotted keys,
YAML values) are applied on top. See `bigtrain.config.load`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: checkpoints, TensorBoard events, metrics.jsonl, the resolved config."""
    name: str = ""
    """Free-form run name shown in logs (defaults to the run directory's basename)."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Vocabulary size of the tokenizer. The embedding has `vocab_pad_multiple`-rounded rows; the extra
    rows are never a target and are dropped on export to Hugging Face."""
    vocab_pad_multiple: int = 128
    """The embedding's row count is padded up to a multiple of this (independent of the parallel layout,
    so checkpoints move between layouts; it must be divisible by `parallel.tensor`)."""
    hidden_size: int = 256
    """Model width d."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_attention_heads: int = 8
    """Query heads."""
    num_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means as many as query heads (plain MHA)."""
    ffn_hidden_size: int = 0
    """SwiGLU inner size; 0 means Llama's rule: 2/3 of 4d rounded up to a multiple of `ffn_multiple_of`."""
    ffn_multiple_of: int = 256
    """Rounding for the automatic `ffn_hidden_size`."""
    seq_length: int = 256
    """Training sequence length (tokens per sample, labels excluded)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every weight matrix and the embedding."""
    scaled_init_output_layers: bool = True
    """Scale the init std of each block's two output projections by 1/sqrt(2 * num_layers) (GPT-2 / Megatron)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    attention: Literal["sdpa", "unfused"] = "sdpa"
    """Core attention: torch scaled_dot_product_attention (flash / cuDNN kernels on GPU) or
    megatron's unfused reference implementation (materialises the score matrix: small models only)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train for (the run ends, with a checkpoint, when this many are done)."""
    seed: int = 1234
    """Seed for model init, dropout and the data order."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """Parameter/activation precision. bf16 keeps fp32 master weights and optimizer state in the engine."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 32
    """Samples per optimizer step over all data-parallel ranks; a multiple of micro_batch_size x DP size.
    The quotient is the number of microbatches (gradient accumulation / pipeline microbatches)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to `lr`."""
    decay_steps: int = 0
    """Steps of cosine decay after warmup; 0 means until `steps`."""
    weight_decay: float = 0.1
    """AdamW weight decay (applied to matrices and embeddings, not to norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    log_interval: int = 1
    """Print a console line every this many steps (metrics.jsonl and TensorBoard get every step)."""
    eval_interval: int = 0
    """Evaluate on `data.validation` every this many steps; 0 disables evaluation."""
    eval_batches: int = 4
    """Global batches per evaluation."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts the training model continues greedily at each evaluation (every `train.eval_interval` steps, with
    `data.validation` set); each sample is logged to TensorBoard (text `samples/<i>`) and as an events.jsonl
    event `sample` {prompt, completion}. Sampling draws no random numbers: training is bitwise the same with or
    without it. Empty = no samples."""
    sample_max_new_tokens: int = 32
    """New tokens per in-loop sample (fewer at EOS or when the prompt and sample fill `model.seq_length`)."""
    peak_tflops: float = 989.0
    """Dense peak TFLOP/s per device in the training precision, the denominator of MFU
    (989 = H100 SXM bf16). On CPU the reported MFU is not meaningful."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (megatron-core)."""
    pipeline: int = 1
    """Pipeline-parallel size (megatron-core 1F1B schedule; microbatches from the global batch)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1): norms and dropout run on sequence shards."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3. Supported with pipeline > 1: 0, 1, and 2 with untied embeddings."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward: `selective` recomputes core attention only,
    `full` recomputes every transformer layer."""
    partition_activations: bool = False
    """With `full` checkpointing: keep each checkpointed layer input split across the tensor-parallel ranks
    (DeepSpeed's activation checkpointing; gathered again for the recompute): 1/tensor of the memory."""
    offload_activations: bool = False
    """With `full` checkpointing: keep the checkpointed layer inputs in host memory (DeepSpeed's
    `cpu_checkpointing`): none of them on the GPU, at the cost of copies each way."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = NCCL when a GPU is present, gloo otherwise."""


@dataclass
class DataSource:
    path: str = ""
    """Shards of one dataset: a directory holding `manifest.json` (local, or an http(s)/S3 URL ending in '/':
    `https://host/dir/`, `s3://bucket/prefix/`), or a brace-expanded list of shard files or URLs
    (`/data/x-{000000..000099}.tar`, `https://host/dir/x-{000000..000099}.tar`, `s3://bucket/x-{0..9}.tar`; an
    http(s)/S3 list uses the manifest.json beside its shards when there is one), or a `pipe:COMMAND` with braces,
    whose standard output is a shard. A `pipe:` source runs a shell command: a config file is code. S3 takes its
    endpoint, region and credentials from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    Without a manifest (pipe:, most URL lists) nothing is checked before a shard is read and a shard lost
    mid-read counts as one skipped member, however many it held."""
    weight: float = 1.0
    """Relative sampling weight of this source in the blend."""
    name: str = ""
    """Name shown in logs and in the checkpointed loader state (defaults to the path's basename)."""
    loss_weight: float = 1.0
    """Multi-task weight of this source's token losses: the step's loss is sum(weight x loss) / sum(weight) over
    the trained tokens (0 trains nothing on this source; evaluation is unweighted). With several sources the
    mean loss and trained tokens of each are logged as `train/loss/<name>` and `train/tokens/<name>`."""


@dataclass
class ValidationSet:
    path: str = ""
    """Held-out shards (same forms as a source path)."""
    name: str = ""
    """Its name in metrics (`val/<name>/loss`); defaults to the path's basename."""


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    """Training sources blended by weight (`data.sources=[{path: DIR, weight: 1}]`)."""
    validation: list[ValidationSet] = field(default_factory=list)
    """Held-out sets, each evaluated every `train.eval_interval` steps: one path (`data.validation=DIR`), a list
    of paths or of `{name, path}`, or a mapping `{name: path}`. Each logs `val/<name>/loss` and `val/<name>/ppl`
    (token-weighted over `train.eval_batches` global batches, the same under any layout); `val_loss` is the first
    set's loss. Empty = no evaluation."""
    tokenizer: str = ""
    """Tokenizer: a sentencepiece `.model` file or an HF `tokenizer.json`. Checked against the shards' manifest."""
    lanes: int = 0
    """Independent read streams the global sample order is striped over; 0 = as many as the source with the
    fewest shards allows, at most 64. Fixed for the life of a run (stored in checkpoints): data-parallel
    sizes that divide it read disjoint shards."""
    max_skip_fraction: float = 0.05
    """Stop the run when corrupt or unreadable tar members skipped so far exceed this fraction of the members
    read (each data-parallel rank counts the lanes it reads, over at least 1,000 members, so a few early bad
    ones don't stop a run; a shard lost mid-read counts the members its manifest says were left, as one where
    there is no manifest)."""
    document_masking: bool = False
    """Attention stays inside each document of a packed sample and RoPE positions restart at each document (a
    document starts at a chat shard's DOC_START flag, or after an EOS in plain shards); a document's first token is
    not predicted from the one before. For SFT on packed conversations, and pretraining with packed documents."""
    num_workers: int = 0
    """Background loader processes per rank (0 = read in the training process)."""
    stall_timeout: float = 60.0
    """Seconds a shard read (http(s), S3, `pipe:`) may go without receiving a byte before it fails (a
    stalled `pipe:` command is killed). Also the read timeout of every HTTP and S3 request."""
    connect_timeout: float = 10.0
    """Seconds to connect to an http(s) or S3 server before the attempt fails."""
    retries: int = 3
    """Retries per shard (and per remote manifest.json) after a transient failure: connection refused or reset,
    a timeout or stall, HTTP 408/429/5xx, S3 throttling, a response cut short. A read that broke mid-shard
    resumes at the byte it reached (HTTP Range, S3 ranged GET), so nothing is lost. Not retried: a missing object
    (HTTP 404, S3 NoSuchKey), other errors, `pipe:` commands (a non-zero exit, a stall, a truncated tar). A shard
    that still fails is skipped and its lost members counted against `max_skip_fraction`; a manifest that cannot
    be read stops the start-up."""
    retry_backoff: float = 1.0
    """Seconds before the first retry of a shard, doubled for each further one."""
    prepare: Literal["", "stdlib"] = ""
    """Build the tokenizer and shards this section names from a built-in corpus when they are missing
    (`stdlib`: the Python standard library's sources, no download). Local paths only: with a URL or `pipe:`
    source, validation set or tokenizer the config is refused."""

    def validation_sets(self) -> list[tuple[str, str]]:
        """(name, path) of each held-out set, names defaulting to the path's basename (a plain string assigned in
        code is one set)."""
        v = self.validation
        items = ([ValidationSet(path=v)] if v else []) if isinstance(v, str) else v
        return [(s.name or os.path.basename(s.path.rstrip("/")) or s.path, s.path) for s in items]


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0 = only at the end and on request)."""
    keep: int = 3
    """Keep the newest this many checkpoints in `run.dir/checkpoints`; older ones are deleted."""
    load: str = ""
    """Start from this checkpoint (a checkpoint directory or a run directory) instead of the
    run directory's own latest. Model weights only are taken when `load_optimizer` is false."""
    load_optimizer: bool = True
    """With `load`: also restore optimizer, step, LR schedule and data position (a true resume)."""
    async_save: bool = True
    """Write checkpoints in the background after a short in-memory snapshot."""
    max_failures: int = 3
    """Stop the run after this many saves in a row have failed (each failure is a `checkpoint_failed` event; the
    next interval tries again)."""
    verify: bool = True
    """Check every file of a checkpoint against the checksum in its index before loading it (all ranks share the
    reading); a mismatch names the file and falls back to the previous checkpoint, like a torn one."""


@dataclass
class GuardConfig:
    nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or global gradient norm is not finite (all ranks agree with one all-reduce): `skip`
    leaves weights, AdamW moments, the step counter and the LR schedule untouched, consumes the batch and tries
    the step again with the next one (counted as `skipped_steps`); `stop` ends the run with an error."""
    max_consecutive_skips: int = 5
    """Stop the run (one-line error, last good checkpoint kept) after this many skipped steps in a row."""
    spike_sigmas: float = 6.0
    """A step whose loss (or another of `spike_metrics`) exceeds the mean of the last `spike_window` normal steps
    by this many standard deviations (at least 1% of the mean) is a spike: logged as an event, counted for
    rewinds. 0 turns spike detection off."""
    spike_metrics: list[Literal["loss", "grad_norm"]] = field(default_factory=lambda: ["loss"])
    """What the spike detector watches. The gradient norm swings widely early in training; add it for a
    warning that comes before the loss spikes, with a long `spike_warmup`."""
    spike_window: int = 100
    """Steps of history the spike detector keeps (spikes themselves are left out)."""
    spike_warmup: int = 20
    """Steps of history needed before the detector looks for spikes."""
    rewind_after: int = 3
    """Rewind when this many anomalies (spikes and skipped steps) fall within the last `rewind_window` batches:
    restore the newest healthy checkpoint from before them and skip every batch drawn since (PaLM's recipe;
    recorded in RUN/skipped_batches.json, so restarts skip them too). 0 never rewinds."""
    rewind_window: int = 200
    """Batches over which anomalies are counted for `rewind_after`."""
    rewind_margin: int = 10
    """A rewind, or a run the guards stop, goes back to a checkpoint at least this many steps older than the first
    anomaly: a run can go bad a few steps before it shows (a huge update, then a normal-looking loss, then NaN)."""
    max_rewinds: int = 3
    """Most rewinds in the life of a run (counted in RUN/skipped_batches.json); one more stops it."""


@dataclass
class FaultSpec:
    kind: Literal["nan_loss", "inf_grad", "spike", "error", "hang", "stop", "kill", "slow"] = "nan_loss"
    """`nan_loss`: the logits of this rank (it must hold the output layer: a last pipeline stage) become NaN;
    `inf_grad`: one element of one gradient on this rank becomes inf; `spike`: this rank's logits are multiplied
    by `value`; `error`: this rank raises an exception in its forward pass; `hang`: this rank sleeps `value`
    seconds in its forward pass; `stop`: this rank stops itself (SIGSTOP) in its forward pass, as a frozen
    process would; `kill`: this rank kills itself (SIGKILL) in its forward pass, as the OOM killer or a lost node
    would; `slow`: from this batch on, this rank computes for `value` extra seconds in each forward
    pass (a straggler)."""
    batch: int = 0
    """Global batch index (0-based, every batch drawn counts, skipped ones too) whose step the fault hits."""
    rank: int = 0
    """Global rank that injects the fault."""
    value: float = 30.0
    """For `spike`: the factor on the logits; for `hang` and `slow`: seconds."""
    restart: int = -1
    """Inject only in the run with this SLURM_RESTART_COUNT (0 = the first run; -1 = every run)."""


@dataclass
class DebugConfig:
    faults: list[FaultSpec] = field(default_factory=list)
    """Faults injected into the real training step, to try the guards on a live run
    (`debug.faults=[{kind: nan_loss, batch: 3, rank: 1}]`). Empty in real runs."""


@dataclass
class DistillConfig:
    teacher: str = ""
    """Distil from this frozen teacher: a bigtrain checkpoint or run directory (an HF model after `bigtrain convert
    from-hf`). It may differ from the student in width and depth but must share its tokenizer and padded
    vocabulary. Empty = no distillation. The resolved checkpoint is recorded in the run's checkpoints; a resume
    reloads exactly that one."""
    alpha: float = 0.5
    """The mix: loss = (1 - alpha) * cross-entropy + alpha * KD, per trained token."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the KD term."""
    scale_by_t2: bool = True
    """Multiply the KD term by temperature^2 (Hinton et al.): its gradients then keep their size as the
    temperature changes, so `alpha` means the same at any temperature."""


@dataclass
class WatchdogConfig:
    """Hang detection. Each rank times every phase of the run in a thread of its own; a phase that outlives its
    budget is a hang: every thread's stack goes to `run.dir/hangs/restart<N>-rank<R>.txt` (faulthandler), the
    rank prints one line naming itself, the phase and the step, and exits with status 124. Under SLURM the job
    requeues itself and resumes from its last checkpoint (at most launch.max_requeues times, as for
    preemptions), unless it already hung at the same step and phase before. Every hang is a line in
    `run.dir/hangs/hangs.jsonl`."""
    enabled: bool = True
    """Run the watchdog (collective timeouts apply either way)."""
    startup_timeout: float = 1800.0
    """Seconds the start-up may take: process groups, model, data checks, restore. Also the collective timeout
    until the first step is done."""
    first_step_timeout: float = 900.0
    """Seconds the first step after a start or resume may take (warm-up, allocator, first data reads)."""
    step_timeout: float = 0.0
    """Seconds one step may take before it counts as hung; 0 = derived from the measured step times:
    max(watchdog.min_step_timeout, watchdog.step_timeout_factor x the slowest of the last 100 steps), and with
    remote or `pipe:` sources at least the time one shard read may take before the loader gives it up
    ((data.retries + 1) x (data.connect_timeout + data.stall_timeout) + the backoff)."""
    step_timeout_factor: float = 10.0
    """With step_timeout = 0: the budget as a multiple of the slowest recent step."""
    min_step_timeout: float = 60.0
    """With step_timeout = 0: the least budget a step gets."""
    checkpoint_timeout: float = 1800.0
    """Seconds a checkpoint save (its synchronous part and any wait for the background writers), a rewind's
    restore or the final save may take."""
    evaluation_timeout: float = 1800.0
    """Seconds one evaluation (every held-out set) or one round of in-loop samples may take."""
    collective_timeout: float = 1800.0
    """Seconds a collective may wait for the other ranks once the first step is done, on every process group
    (the world's, megatron's, DeepSpeed's); it backs the watchdog up inside collectives, so keep it at least
    the longest phase budget. A collective that times out is a hang like any other."""


@dataclass
class LaunchConfig:
    max_requeues: int = 20
    """Most times a SLURM job requeues itself after a preemption or time limit."""
    signal_seconds: int = 120
    """Seconds before the time limit SLURM sends the checkpoint signal, for `bigtrain submit` (submitit's
    `--signal=USR2@N`); the sbatch files in slurm/ set their own `--signal=USR1@120`."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Llama-style GPT."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and the step loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data, tensor, pipeline parallelism and ZeRO."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards, blending and the tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Sharded checkpoints and resume."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """SLURM requeue behaviour."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """What keeps a run from going bad silently: non-finite steps, loss spikes, rewinds."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """Hang detection: per-phase time budgets, stack dumps, requeue after a hang, collective timeouts."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection for trying the guards (off unless set)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Teacher-student distillation (off unless `distill.teacher` is set)."""


def kv_heads(m: ModelConfig) -> int:
    return m.num_kv_heads or m.num_attention_heads


def ffn_size(m: ModelConfig) -> int:
    if m.ffn_hidden_size:
        return m.ffn_hidden_size
    inner = int(2 * 4 * m.hidden_size / 3)
    return m.ffn_multiple_of * ((inner + m.ffn_multiple_of - 1) // m.ffn_multiple_of)


def padded_vocab(m: ModelConfig) -> int:
    mult = m.vocab_pad_multiple
    return mult * ((m.vocab_size + mult - 1) // mult)
