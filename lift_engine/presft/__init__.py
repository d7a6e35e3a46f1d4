"""Pre-LIFT supervised fine-tuning (docs/DESIGN.md §2.7): `lift pre-sft`.

    documents = read_corpus(["docs/", "longbench.jsonl"], PreSftConfig(synthetic=100))
    outcome = run_pre_sft(base, documents, "models/presft", lift_cfg, PreSftConfig())

    corpus.py    the corpus: directories, LongBench/LooGLE jsonl (gold QA), synthetic documents
    samples.py   CorpusSamples: every document's LIFT samples as one mixed plan
    merge.py     the shared LoRA merged into the base's weights; the model directory written
    run.py       the run: one BatchTuneJob entry, one slot, resumable; then merge and write
"""
