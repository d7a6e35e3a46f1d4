"""`lift demo`: the main job on the embedded default model, in minutes on a CPU.

A bundled long document of invented facts (the model cannot know them) is tuned into an
adapter on the spot; its questions are answered with truncated ICL, with full-context
ICL and with LIFT (adapter + truncated context), and an accuracy table is printed.
"""
from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from lift_engine import metrics
from lift_engine.config import LiftConfig
from lift_engine.data.documents import tokenize_long
from lift_engine.evaluate import cache_root
from lift_engine.inference import AnswerRequest, greedy_answers
from lift_engine.models.loading import LoadedModel
from lift_engine.pipeline import load_tuned, tune_document
from lift_engine.prompts import PromptBuilder

ASSETS = "lift_engine.data.assets"


def demo_document() -> str:
    return resources.files(ASSETS).joinpath("demo_document.md").read_text(encoding="utf-8")


def demo_questions() -> list[dict]:
    """[{question, answers}] from the bundled jsonl."""
    rows = []
    text = resources.files(ASSETS).joinpath("demo_questions.jsonl").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            answers = row.get("answers") or [row.get("answer")]
            rows.append({"question": row.get("input") or row.get("question"), "answers": [a for a in answers if a]})
    return rows


def _answers(base, prompts, questions, doc_ids, window, cfg, handle, desc) -> list[str]:
    """One table column: every question decoded in batches (greedy_answers), slot 0 of
    `handle` (with the config's confidence routing) or the base model."""
    slot = 0 if handle is not None else None
    requests = [AnswerRequest(q["question"], doc_ids=doc_ids, window=window, slot=slot) for q in questions]
    with tqdm(total=len(questions), desc=desc, unit="q", dynamic_ncols=True) as bar:
        return greedy_answers(base.model, base.tokenizer, prompts, requests, handle=handle,
                              max_new_tokens=cfg.inference.max_new_tokens, progress=bar.update,
                              route_by_confidence=handle is not None and cfg.inference.route_by_confidence)


def run_demo(base: LoadedModel, cfg: LiftConfig, out_dir: Path | None = None, log=print) -> dict:
    """Tune the bundled document, answer its questions three ways, print the table."""
    text, questions = demo_document(), demo_questions()
    prompts = PromptBuilder(base.tokenizer, cfg.inference.use_chat_template)
    doc_ids = tokenize_long(text, base.tokenizer)
    window = cfg.inference.window
    log(f"demo document: {len(doc_ids)} tokens; questions: {len(questions)}; window: {window} tokens "
        f"(truncation keeps {min(1.0, window / len(doc_ids)):.0%} of the document)")
    began = time.monotonic()
    icl = _answers(base, prompts, questions, doc_ids, window, cfg, None, "truncated ICL")
    full = _answers(base, prompts, questions, doc_ids, None, cfg, None, "full-context ICL")
    adapter_dir = out_dir or cache_root() / "demo" / f"adapter-{cfg.adapter}-{cfg.fingerprint()}"
    if (Path(adapter_dir) / "lift_adapter.json").is_file():
        log(f"reusing the adapter tuned earlier: {adapter_dir}")
    else:
        tune_document(base, text, adapter_dir, cfg, source="demo_document.md", log=log)
    handle = load_tuned(base, adapter_dir)
    try:
        lift = _answers(base, prompts, questions, doc_ids, window, cfg, handle, "LIFT")
    finally:
        handle.remove()
    table = {"truncated ICL": icl, "LIFT + truncated ICL": lift, "full-context ICL": full}
    results = {name: [metrics.score(a, q["answers"]) for a, q in zip(answers, questions)]
               for name, answers in table.items()}
    _print_table(questions, table, results, log)
    summary = {name: metrics.aggregate(rows) for name, rows in results.items()}
    summary["seconds"] = round(time.monotonic() - began, 1)
    summary["adapter_dir"] = str(adapter_dir)
    return summary


def _print_table(questions, table, results, log) -> None:
    names = list(table)
    log("")
    log("  #  expected                      " + "  ".join(f"{n:>22}" for n in names))
    for i, q in enumerate(questions):
        marks = "  ".join(f"{('✓' if results[n][i]['contains_answer'] else '✗') + ' ' + _clip(table[n][i], 18):>22}"
                          for n in names)
        log(f"{i + 1:>3}  {_clip(q['answers'][0], 28):<28}  {marks}")
    log("")
    for n in names:
        agg = metrics.aggregate(results[n])
        correct = sum(1 for r in results[n] if r["contains_answer"])
        log(f"{n:>22}: {correct}/{len(questions)} answers contain the expected one; "
            f"qa-F1 {agg['qa_f1']:.3f}, ROUGE-L {agg['rouge_l']:.3f}")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
