"""Builds training and evaluation data for `polyrank train` / `polyrank eval` (deterministic).

Sources:
- PyPI `chitchat-dataset` (MIT): conversations are split by a hash of their key, so whole
  dialogues never cross splits: key-hash % 10 == 0 → test, == 1 → valid, else train.
- ../shared/data/spc/Synthetic-Persona-Chat_test.csv (CC-BY-4.0), when present: written in
  ParlAI's ConvAI2 text format, persona lines folded into the context.

Outputs under data/dialogues/:
- train.jsonl          {"context": [turns], "response": text}       (--train-pairs pairs)
- valid20.jsonl        {"context": [turns], "candidates": [20], "label": i}  (per-epoch R@1)
- chitchat-test20.jsonl the held-out table's set (--test-examples examples)
- spc-test20.txt       ConvAI2 format (when the SPC file is present)
A context is the last --turns turns before the response. Negatives are 19 responses drawn at
random from a fixed sample of 1,000 responses of the same split.
"""
import argparse
import csv
import hashlib
import json
import random
from pathlib import Path

import chitchat_dataset

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "dialogues"
SPC = ROOT.parent / "shared" / "data" / "spc" / "Synthetic-Persona-Chat_test.csv"


def split_of(key):
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "valid" if h == 1 else "train"


def chitchat_pairs(turns_kept):
    data = chitchat_dataset.Dataset()
    pairs = {"train": [], "valid": [], "test": []}
    for key in sorted(data):
        turns = [" ".join(u["text"] for u in m).strip() for m in data[key]["messages"]]
        turns = [t for t in turns if t]
        for i in range(1, len(turns)):
            pairs[split_of(key)].append({"context": turns[max(0, i - turns_kept):i], "response": turns[i]})
    return pairs


def with_candidates(pairs, n, rng, n_cands=20, negative_pool=1000):
    """Eval examples: the true response among n_cands - 1 random other responses of the split.

    Negatives come from a fixed random sample of the split's responses, so examples share
    candidates and the encoder runs on far fewer distinct texts."""
    responses = rng.sample(sorted({p["response"] for p in pairs}), negative_pool)
    out = []
    for p in rng.sample(pairs, min(n, len(pairs))):
        negs = []
        while len(negs) < n_cands - 1:
            r = rng.choice(responses)
            if r != p["response"] and r not in negs:
                negs.append(r)
        label = rng.randrange(n_cands)
        cands = negs[:label] + [p["response"]] + negs[label:]
        out.append({"context": p["context"], "candidates": cands, "label": label})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def spc_convai2(rng, max_examples):
    """User 2 answers; their persona is 'your persona:' lines, as in ConvAI2's 'self' files."""
    rows = list(csv.DictReader(open(SPC, encoding="utf-8")))
    episodes, responses = [], []
    for row in rows:
        persona = [p.strip() for p in row["user 2 personas"].split("\n") if p.strip()]
        turns = []
        for line in row["Best Generated Conversation"].split("\n"):
            line = line.strip()
            for who in ("User 1:", "User 2:"):
                if line.startswith(who):
                    turns.append((who, line[len(who):].strip()))
        pairs = []  # (partner text, user 2 reply)
        for a, b in zip(turns, turns[1:]):
            if a[0] == "User 1:" and b[0] == "User 2:" and a[1] and b[1]:
                pairs.append((a[1], b[1]))
                responses.append(b[1])
        if pairs:
            episodes.append((persona, pairs))
    responses = sorted(set(responses))
    lines, count = [], 0
    clean = lambda s: s.replace("\t", " ").replace("|", " ").replace("\n", " ")
    for persona, pairs in episodes:
        if count >= max_examples:
            break
        n = 1
        for p in persona:
            lines.append(f"{n} your persona: {clean(p)}")
            n += 1
        for text, reply in pairs:
            negs = []
            while len(negs) < 19:
                r = rng.choice(responses)
                if r != reply and r not in negs:
                    negs.append(r)
            label = rng.randrange(20)
            cands = negs[:label] + [reply] + negs[label:]
            lines.append(f"{n} {clean(text)}\t{clean(reply)}\t\t" + "|".join(clean(c) for c in cands))
            n += 1
            count += 1
    return "\n".join(lines) + "\n", count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--train-pairs", type=int, default=10000)
    ap.add_argument("--valid-examples", type=int, default=300)
    ap.add_argument("--test-examples", type=int, default=1000)
    ap.add_argument("--spc-examples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    pairs = chitchat_pairs(a.turns)
    train = rng.sample(pairs["train"], min(a.train_pairs, len(pairs["train"])))
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "valid20.jsonl", with_candidates(pairs["valid"], a.valid_examples, rng))
    write_jsonl(OUT / "chitchat-test20.jsonl", with_candidates(pairs["test"], a.test_examples, rng))
    sizes = {k: len(v) for k, v in pairs.items()}
    msg = f"chitchat pairs per split {sizes}; wrote {len(train)} train pairs"
    if SPC.exists():
        text, n = spc_convai2(rng, a.spc_examples)
        (OUT / "spc-test20.txt").write_text(text, encoding="utf-8")
        msg += f"; {n} SPC ConvAI2 examples"
    print(msg)


if __name__ == "__main__":
    main()
