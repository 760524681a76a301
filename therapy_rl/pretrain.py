"""Causal-LM pre-training of a small GPT-2 on dialogue text from ``$THERAPY_RL_DATA`` (stage 1 of therapy_rl.repro).

The corpus (``corpus_documents``): ESConv train + valid, EmpatheticDialogues, counsel_chat, AnnoMI, the Reddit sets
(depression_severity, reddit_cssrs, sdcnl, epitome) and MESC **train** dialogues only. Any line equal to an
utterance of MESC val/test or ESConv test is dropped (``heldout_utterances``; tests/test_repro.py checks that none
is left). Documents are tokenized with a byte-level BPE trained on the corpus (the project's markers reserved, so
SFT adds nothing), joined with ``<eos>`` and cut into fixed blocks; every token is a target.

Outputs in ``workdir``: ``tokenizer/``, ``checkpoints/`` (resumable), ``hf/`` (an HF GPT-2 folder with the
tokenizer: SFT starts from it with ``model.hf_checkpoint`` and ``tokenizer.path``), ``summary.json`` (parameters,
tokens seen, validation loss and perplexity, corpus sizes per source), ``metrics.jsonl``.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys
import time
from typing import Iterator

import numpy as np

REDDIT = ("depression_severity", "reddit_cssrs", "sdcnl", "epitome")
ALL_SOURCES = ("mesc_train", "esconv", "empatheticdialogues", "counsel_chat", "annomi") + REDDIT


def _csv_rows(path: str) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        yield from csv.DictReader(f)


def _grouped(rows, key: str, text: str) -> list[str]:
    docs: dict = {}
    for r in rows:
        t = (r.get(text) or "").strip()
        if t:
            docs.setdefault(r.get(key), []).append(t)
    return ["\n".join(v) for v in docs.values()]


def _dialogue_docs(dialogues) -> list[str]:
    return ["\n".join(u.text for u in d.utterances) for d in dialogues]


def read_source(root: str, name: str) -> list[str]:
    """Documents (one string per dialogue / post / thread) of one pre-training source."""
    from therapy_rl.data import sources

    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    if name == "mesc_train":
        return _dialogue_docs(sources.read_mesc(j("mesc"), "train")[0])
    if name == "esconv":
        return [doc for split in ("train.txt", "valid.txt") for doc in _dialogue_docs(
            sources.read_esconv(j("esconv", split), strict=False)[0])]
    if name == "empatheticdialogues":
        docs = []
        for path in sorted(glob.glob(j("empatheticdialogues_intents", "empatheticdialogues_annotated", "*.csv"))):
            docs += _grouped(_csv_rows(path), "Dialog_ID", "Text")
        return docs
    if name == "counsel_chat":
        return [f"{r['questionTitle']}\n{r['questionText']}\n{r['answerText']}".strip()
                for r in _csv_rows(j("counsel_chat", "20200325_counsel_chat.csv"))]
    if name == "annomi":
        return _grouped(_csv_rows(j("annomi", "AnnoMI-simple.csv")), "transcript_id", "utterance_text")
    if name == "depression_severity":
        return [r["text"] for r in _csv_rows(j("depression_severity", "Reddit_depression_dataset.csv")) if r["text"]]
    if name == "reddit_cssrs":
        return [r["Post"] for r in _csv_rows(j("reddit_cssrs", "500_Reddit_users_posts_labels.csv")) if r["Post"]]
    if name == "sdcnl":
        return [f"{r['title']}\n{r['selftext']}".strip() for f in ("training-set.csv", "testing-set.csv")
                for r in _csv_rows(j("sdcnl", f))]
    if name == "epitome":
        return [f"{r['seeker_post']}\n{r['response_post']}" for f in sorted(glob.glob(j("epitome", "*.csv")))
                for r in _csv_rows(f)]
    raise ValueError(f"pre-training source {name!r}: expected one of {ALL_SOURCES}")


def heldout_utterances(root: str) -> set[str]:
    """Every utterance text of MESC val/test and ESConv test (never pre-trained on)."""
    from therapy_rl.data import sources

    out = set()
    for split in ("val", "test"):
        out |= {u.text.strip() for d in sources.read_mesc(os.path.join(root, "mesc"), split)[0] for u in d.utterances}
    out |= {u.text.strip() for d in sources.read_esconv(os.path.join(root, "esconv", "test.txt"), strict=False)[0]
            for u in d.utterances}
    return {t for t in out if t}


def corpus_documents(root: str, names=ALL_SOURCES, max_docs_per_source: int = 0) -> tuple[list[str], dict]:
    """(documents, {source: {"documents", "characters", "dropped_lines"}}), held-out lines removed."""
    heldout = heldout_utterances(root)
    docs, stats = [], {}
    for name in names:
        kept, dropped = [], 0
        for doc in read_source(root, name)[:max_docs_per_source or None]:
            lines = [ln for ln in doc.split("\n") if ln.strip()]
            clean = [ln for ln in lines if ln.strip() not in heldout]
            dropped += len(lines) - len(clean)
            if clean:
                kept.append("\n".join(clean))
        docs += kept
        stats[name] = {"documents": len(kept), "characters": sum(map(len, kept)), "dropped_lines": dropped}
    return docs, stats


def token_blocks(tok, docs: list[str], block: int) -> np.ndarray:
    """int32 [N, block]: the documents' ids, each followed by <eos>, concatenated and cut (the tail dropped)."""
    eos = tok.marker_ids["<eos>"]
    ids = []
    for start in range(0, len(docs), 512):
        for row in tok.hf(docs[start:start + 512], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    n = len(ids) // block
    return np.asarray(ids[:n * block], np.int32).reshape(n, block)


def run(cfg, workdir: str, data_root: str, seed: int = 42) -> dict:
    """Trains (or resumes) the pre-training stage in ``workdir``; returns summary.json's content."""
    import jax
    import ml_collections

    from therapy_rl import checkpoint, optim, parallel, sft
    from therapy_rl.data import batches, tokenize
    from therapy_rl.metrics_writer import MetricsWriter
    from therapy_rl.models import families, gpt2, hf_io

    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    docs, stats = corpus_documents(data_root, tuple(cfg.sources), cfg.max_docs_per_source)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_val = max(1, int(len(docs) * cfg.val_fraction))
    val_docs, train_docs = [docs[i] for i in order[:n_val]], [docs[i] for i in order[n_val:]]
    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tok_dir):
        tokenize.train_bpe_tokenizer(train_docs, cfg.bpe_vocab_size, tok_dir + ".building")
        os.replace(tok_dir + ".building", tok_dir)
    tok = tokenize.load_tokenizer(tok_dir)
    train = token_blocks(tok, train_docs, cfg.block_tokens)
    val = token_blocks(tok, val_docs, cfg.block_tokens)[:cfg.max_val_blocks or None]
    arrays = lambda x: {"input_ids": x, "attention_mask": np.ones_like(x),  # noqa: E731
                        "loss_mask": np.ones(x.shape, np.float32)}

    model_config = gpt2.GPT2Config(vocab_size=tok.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                   n_embd=cfg.n_embd, n_positions=cfg.n_positions, dropout_rate=cfg.dropout_rate)
    mesh = parallel.make_mesh(parallel.MeshShape(-1, 1, 1))
    iterator = batches.BatchIterator(arrays(train), cfg.batch_size, seed=seed)
    total = cfg.max_steps
    opt_cfg = optim.optimizer_config_from(ml_collections.ConfigDict(dict(
        learning_rate=cfg.learning_rate, warmup_fraction=cfg.warmup_fraction, lr_schedule="cosine",
        weight_decay=cfg.weight_decay, grad_clip_norm=1.0)), total)
    optimizer = optim.make_optimizer(opt_cfg)
    model = families.module(model_config)
    state, shardings = sft.init_train_state(lambda key: gpt2.init_params(model_config, key), optimizer, seed,
                                            mesh, families.partition_rules(model_config))
    last_ckpt, _ = checkpoint.run_checkpointers(workdir, 1)
    if last_ckpt.latest_step() is not None:
        state, extras = last_ckpt.restore(state)
        iterator.set_state(extras["data_iterator"])
        print(f"[pretrain] resumed from step {int(state.step)}")
    example = next(iter(batches.eval_batches(arrays(train[:cfg.batch_size]), cfg.batch_size)))
    train_step = sft.jit_train_step(sft.make_train_step(model, optimizer, 1, dropout=cfg.dropout_rate > 0), mesh,
                                    shardings, example)
    eval_step = sft.jit_eval_step(sft.make_eval_step(model), mesh, shardings.params, example)

    def val_loss():
        it = (parallel.global_batch_from_host(b, mesh) for b in batches.eval_batches(arrays(val), cfg.batch_size))
        return sft.evaluate_loss(eval_step, state.params, it)["val/loss"]

    writer = MetricsWriter(workdir, total, initial_step=int(state.step), description="pretrain",
                           enable_progress_bar=False)
    step = int(state.step)
    try:
        while step < total:
            state, metrics = train_step(state, parallel.global_batch_from_host(next(iterator), mesh))
            step += 1
            if step % cfg.log_every_steps == 0 or step == total:
                writer.write(step, {k: float(v) for k, v in jax.device_get(metrics).items() if k.startswith("train")})
            if step % cfg.eval_every_steps == 0 or step == total:
                writer.write(step, {"val/loss": val_loss()})
                last_ckpt.save(step, state, {"data_iterator": iterator.get_state()})
    finally:
        writer.close()
    loss = val_loss()
    hf_dir = os.path.join(workdir, "hf")
    params = jax.device_get(state.params)
    hf_io.save_hf_gpt2(model_config, params, hf_dir, bos_token_id=tok.marker_ids["<bos>"],
                       eos_token_id=tok.marker_ids["<eos>"], pad_token_id=tok.marker_ids["<pad>"])
    tok.save(hf_dir)
    summary = {"parameters": int(gpt2.count_params(params)), "steps": step,
               "tokens_seen": int(step * cfg.batch_size * cfg.block_tokens),
               "train_tokens": int(train.size), "val_tokens": int(val.size), "val_loss": float(loss),
               "val_perplexity": float(math.exp(min(loss, 50.0))), "vocab_size": int(tok.vocab_size),
               "shape": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd},
               "sources": stats, "wall_s_this_call": time.time() - t0}
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"[pretrain] {summary['parameters'] / 1e6:.2f}M params, {summary['tokens_seen']} tokens seen, "
          f"val perplexity {summary['val_perplexity']:.2f}")
    return summary
