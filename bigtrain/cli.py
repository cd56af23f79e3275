"""`bigtrain` command line: train, config, plan, tokenizer, shards, data, submit, convert, eval, generate, plot, lm-eval.

Each subcommand parses its arguments here and calls one function of the package; user mistakes
(`BigtrainError`) end as one `bigtrain: error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from .errors import BigtrainError


def _train(a):
    from .config import load_config
    from .parallel.env import env_rank
    from .train import lock
    from .train.stop import EXIT_REQUEUE
    cfg = load_config(a.config, a.overrides)
    if env_rank() == 0:  # a run directory in use is refused here, before the slow imports (torch, megatron)
        lock.acquire(cfg.run.dir)
    from .train import train
    if train(cfg).stopped:
        sys.exit(EXIT_REQUEUE)  # checkpointed and stopped early: come back later


def _config(a):
    from .config import describe, load_config
    print("\n".join(describe(load_config(a.config, a.overrides))))


def _tokenizer_train(a):
    from .data.tokenizer import train_tokenizer
    train_tokenizer(a.input, a.vocab_size, a.output, max_sentences=a.max_sentences)


def _shards(a):
    if a.format == "chat":
        from .data.chat import write_chat_shards
        write_chat_shards(a.tokenizer, a.input, a.output, a.seq_len, messages_key=a.text_key or "messages",
                          too_long=a.too_long, samples_per_member=a.samples_per_member, shard_samples=a.shard_samples)
        return
    from .data.shards import write_shards
    write_shards(tokenizer=a.tokenizer, inputs=a.input, output=a.output, seq_len=a.seq_len,
                 text_key=a.text_key or "text", samples_per_member=a.samples_per_member,
                 shard_samples=a.shard_samples, workers=a.workers, append_eos=not a.no_eos)


def _data_show(a):
    from .data.show import show
    print(show(a.dir, a.samples, a.tokenizer, as_json=a.json))


def _submit(a):
    from .launch.submit import submit
    submit(a)


def _convert_to_hf(a):
    from .convert.hf import to_hf
    to_hf(a.src, a.out, tokenizer=a.tokenizer)


def _convert_from_hf(a):
    from .convert.hf import from_hf
    from_hf(a.src, a.out, gguf_file=a.gguf_file)


def _eval(a):
    from .eval.perplexity import main as run_eval
    run_eval(a.src, a.data or [], a.batches, a.overrides)


def _generate(a):
    from .eval.generate import main as run_generate
    run_generate(a.src, a.prompt or [], a.prompt_file, a.overrides, max_new_tokens=a.max_new_tokens,
                 temperature=a.temperature, top_p=a.top_p, seed=a.seed, kv_cache=not a.no_kv_cache)


def _plan(a):
    from .parallel.plan import plan
    print(plan(a.config, a.overrides, a.gpus, a.gpu_mem_gib, a.gpus_per_node, as_json=a.json))


def _plot(a):
    from .eval.plot import plot_runs
    print(plot_runs(a.runs, a.output, x=a.x))


def _lm_eval(a):
    import json
    from .eval.harness import lm_eval_run
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
    print(json.dumps(lm_eval_run(a.src, tasks=tasks, limit=a.limit, output=a.output, include_path=a.include_path,
                                 device=a.device, batch_size=a.batch_size, tokenizer=a.tokenizer), indent=1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigtrain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run: bigtrain train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20")
    t.set_defaults(func=_train)

    c = sub.add_parser("config", help="print the resolved config with every key's documentation")
    c.add_argument("config", nargs="?", help="YAML config file (defaults only if omitted)")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_config)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tt = tok.add_parser("train", help="train a sentencepiece BPE tokenizer with byte fallback")
    tt.add_argument("--input", nargs="+", required=True, help="text, .jsonl, .parquet files, .gz/.zst of text or "
                    "jsonl (globs allowed; see `bigtrain shards --help`)")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    tt.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    tt.set_defaults(func=_tokenizer_train)

    s = sub.add_parser("shards", help="tokenize text into WebDataset shards of packed token sequences")
    s.add_argument("--tokenizer", required=True, help="sentencepiece .model or HF tokenizer.json")
    s.add_argument("--input", nargs="+", required=True,
                   help="files or globs ('**' recursive, 'exclude:PATTERN'): plain text (one document per file), "
                   ".jsonl/.ndjson (one per line, field --text-key), .parquet (one per row, string column "
                   "--text-key, read a row group at a time), and .gz or .zst/.zstd of text or jsonl")
    s.add_argument("--output", required=True, help="output directory (shards + manifest.json)")
    s.add_argument("--seq-len", type=int, required=True, help="training sequence length (samples hold seq_len+1 ids)")
    s.add_argument("--text-key", default=None, help="JSON field (.jsonl) or column (.parquet) holding the text "
                   "(default text; with --format chat the list of messages, default messages)")
    s.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text: documents joined with EOS; chat: .jsonl conversations {\"messages\": [{\"role\", "
                   "\"content\"}, ...]} rendered with the chat template beside the tokenizer.json, only assistant "
                   "tokens trained, packed whole and padded (see README, Chat fine-tuning data)")
    s.add_argument("--too-long", choices=("drop", "truncate"), default="drop",
                   help="--format chat: a conversation longer than seq_len + 1 tokens is dropped or truncated")
    s.add_argument("--samples-per-member", type=int, default=64, help="packed samples per tar member")
    s.add_argument("--shard-samples", type=int, default=8192, help="samples per shard")
    s.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = all cores)")
    s.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    s.set_defaults(func=_shards)

    dt = sub.add_parser("data", help="shard tools").add_subparsers(dest="data_command", required=True)
    ds = dt.add_parser("show", help="decode the first samples of a shard directory, marking the tokens not "
                                    "trained on ([[...]]) and document starts (⟂)")
    ds.add_argument("dir", help="shard directory (with manifest.json)")
    ds.add_argument("--samples", type=int, default=2, help="how many samples, in stored order (default 2)")
    ds.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the manifest's tokenizer "
                                                      "file, found in DIR or beside it, sha256 checked)")
    ds.add_argument("--json", action="store_true", help='one JSON object per sample: {"sample": i, "spans": '
                    '[{"text", "trained", "doc_start"}]}')
    ds.set_defaults(func=_data_show)

    sb = sub.add_parser("submit", help="submit a training run to SLURM through submitit")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--nodes", type=int, default=1)
    sb.add_argument("--gpus-per-node", type=int, default=8, help="tasks (one per GPU) per node; on CPU nodes, ranks")
    sb.add_argument("--cpus-per-task", type=int, default=None)
    sb.add_argument("--time", type=int, default=60, help="time limit in minutes")
    sb.add_argument("--partition", default=None)
    sb.add_argument("--account", default=None)
    sb.add_argument("--qos", default=None)
    sb.add_argument("--constraint", default=None)
    sb.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    sb.add_argument("--job-name", default="bigtrain")
    sb.add_argument("--folder", default=None, help="submitit job folder (default RUN_DIR/slurm)")
    sb.add_argument("--cpu", action="store_true", help="CPU-only nodes: request no GPUs")
    sb.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    sb.add_argument("--wait", action="store_true", help="wait for the job and print its final state")
    sb.set_defaults(func=_submit)

    ev = sub.add_parser("eval", help="held-out loss and perplexity of a checkpoint, in any layout (one JSON object)")
    ev.add_argument("src", help="a run directory, its checkpoints/ directory or one checkpoint")
    ev.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tensor=2 train.global_batch_size=16")
    ev.add_argument("--data", action="append", metavar="NAME=PATH",
                    help="a set: shard directory or text/jsonl files (tokenized with the run's tokenizer); "
                         "repeatable; default: the run's data.validation")
    ev.add_argument("--batches", type=int, default=None, help="at most this many global batches per set")
    ev.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="sample from a checkpoint, in any layout (one JSON object per prompt)")
    g.add_argument("src", help="a run directory, its checkpoints/ directory or one checkpoint")
    g.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.tensor=2 data.tokenizer=PATH")
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeatable")
    g.add_argument("--prompt-file", default=None, help='prompts, one per line, or a .jsonl of {"prompt": ...}')
    g.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (EOS ends earlier)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (argmax)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                   "whose probability reaches this")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (set anew for each prompt)")
    g.add_argument("--no-kv-cache", action="store_true", help="re-encode the whole prefix for each new token")
    g.set_defaults(func=_generate)

    cv = sub.add_parser("convert", help="convert to and from Hugging Face Llama").add_subparsers(
        dest="conv_command", required=True)
    th = cv.add_parser("to-hf", help="bigtrain checkpoint (or run directory) -> HF Llama directory")
    th.add_argument("src")
    th.add_argument("out")
    th.add_argument("--tokenizer", default=None, help="tokenizer to ship (default: the run's data.tokenizer)")
    th.set_defaults(func=_convert_to_hf)
    fh = cv.add_parser("from-hf", help="HF Llama directory -> bigtrain checkpoint")
    fh.add_argument("src")
    fh.add_argument("out")
    fh.add_argument("--gguf-file", default=None, help="read weights from this GGUF file inside SRC")
    fh.set_defaults(func=_convert_from_hf)

    pn = sub.add_parser("plan", help="per-rank memory of a config's layout on N GPUs, and the layouts that fit")
    pn.add_argument("config", help="YAML config file (see configs/)")
    pn.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tensor=2")
    pn.add_argument("--gpus", type=int, required=True, help="GPUs of the job (all nodes)")
    pn.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU in GiB, e.g. 80")
    pn.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node: tensor parallelism stays inside one")
    pn.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    pn.set_defaults(func=_plan)

    pl = sub.add_parser("plot", help="training curves of one or more runs in one PNG (loss, validation "
                                     "perplexity, lr, tokens/s)")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (their metrics.jsonl)")
    pl.add_argument("-o", "--output", default="curves.png", help="PNG to write (default curves.png)")
    pl.add_argument("--x", choices=("step", "tokens"), default="step",
                    help="x axis: optimizer step, or tokens seen (from each run's config.yaml)")
    pl.set_defaults(func=_plot)

    le = sub.add_parser("lm-eval", help="lm-evaluation-harness, offline, on a run/checkpoint (exported first) "
                                        "or an HF directory; prints one JSON object")
    le.add_argument("src", help="run directory, checkpoint, or exported HF directory (with config.json)")
    le.add_argument("--tasks", default=None, help="comma-separated task names (default: the shipped bigtrain_mc,"
                                                  "bigtrain_text)")
    le.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction if < 1)")
    le.add_argument("--output", default=None, help="also write the JSON object to this file")
    le.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs (local data)")
    le.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    le.add_argument("--batch-size", default="8", help="batch size, or 'auto' (default 8)")
    le.add_argument("--tokenizer", default=None, help="tokenizer to export with a run/checkpoint (default: the "
                                                      "run's data.tokenizer)")
    le.set_defaults(func=_lm_eval)
    return p


def main(argv=None) -> None:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command == "plan" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # overrides after the options: bigtrain plan CONFIG --gpus 8 --gpu-mem-gib 80 k=v
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except BigtrainError as e:
        print(f"bigtrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:  # not about a file: a bug or a network error keeps its traceback
            raise
        print(f"bigtrain: error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bigtrain: interrupted", file=sys.stderr)
        sys.exit(130)
