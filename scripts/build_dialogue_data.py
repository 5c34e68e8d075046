"""Builds training and evaluation data for `polyrank train` / `polyrank eval` (deterministic).

Sources:
- PyPI `chitchat-dataset` (MIT): conversations are split by a hash of their key, so whole
  dialogues never cross splits: key-hash % 10 == 0 → test, == 1 → valid, else train.
- ../shared/data/spc/Synthetic-Persona-Chat_test.csv (CC-BY-4.0, 968 persona conversations),
  when present: split by a hash of the conversation (20 % test, 10 % valid, 70 % train).
  Persona lines are folded into the context as ParlAI's ConvAI2 teacher does
  ("your persona: ..." first, then the dialogue).

Outputs under data/dialogues/:
- train.jsonl          {"context": [turns], "response": text}: every chitchat train pair with
                       the last k turns as context (k drawn from 1..--turns), plus the SPC
                       train pairs of both speakers, --spc-repeat times, each copy with its own
                       k and with the speaker's persona in front half of the time.
- valid20.jsonl        chitchat valid, 20 candidates (recipe choices, per-checkpoint R@1)
- chitchat-valid2000.jsonl the same split, 2,000 examples (choosing between close models)
- spc-valid20.txt      SPC valid, ConvAI2 format (recipe choices)
- chitchat-test20.jsonl chitchat test (the README table only), context = last 3 turns
- spc-test20.txt       SPC test, ConvAI2 format (the README table only)
Eval negatives: 19 responses drawn at random from the same split.
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
EVAL_TURNS = 3


def split_of(key, test=1, valid=1):
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if h < test else "valid" if h < test + valid else "train"


def chitchat_dialogues():
    data = chitchat_dataset.Dataset()
    out = {"train": [], "valid": [], "test": []}
    for key in sorted(data):
        turns = [" ".join(u["text"] for u in m).strip() for m in data[key]["messages"]]
        out[split_of(key)].append([t for t in turns if t])
    return out


def pairs_of(dialogues, turns_kept):
    return [{"context": d[max(0, i - turns_kept):i], "response": d[i]} for d in dialogues for i in range(1, len(d))]


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


def spc_conversations():
    """[(key, {speaker: persona lines}, [(speaker, text)])] in file order."""
    out = []
    for row in csv.DictReader(open(SPC, encoding="utf-8")):
        personas = {
            s: [p.strip() for p in row[f"user {s} personas"].split("\n") if p.strip()] for s in ("1", "2")
        }
        turns = []
        for line in row["Best Generated Conversation"].split("\n"):
            line = line.strip()
            for s in ("1", "2"):
                who = f"User {s}:"
                if line.startswith(who) and line[len(who):].strip():
                    turns.append((s, line[len(who):].strip()))
        key = row["user 1 personas"] + "|" + row["user 2 personas"] + "|" + row["Best Generated Conversation"][:200]
        out.append((key, personas, turns))
    return out


def spc_train_pairs(convs, rng, turns_kept, repeat):
    """Both speakers' replies; persona (of the one replying) in front half of the time."""
    out = []
    for _ in range(repeat):
        for _, personas, turns in convs:
            for i in range(1, len(turns)):
                speaker, reply = turns[i]
                if turns[i - 1][0] == speaker:
                    continue
                k = rng.randint(1, turns_kept)
                ctx = [t for _, t in turns[max(0, i - k):i]]
                if rng.random() < 0.5:
                    ctx = [f"your persona: {p}" for p in personas[speaker]] + ctx
                out.append({"context": ctx, "response": reply})
    return out


def spc_convai2(convs, rng, max_examples):
    """ConvAI2 'self' format: User 2 answers, their persona as 'your persona:' lines."""
    responses = sorted({t for _, _, turns in convs for s, t in turns if s == "2"})
    clean = lambda s: s.replace("\t", " ").replace("|", " ").replace("\n", " ")
    lines, count = [], 0
    for _, personas, turns in convs:
        pairs = [(a[1], b[1]) for a, b in zip(turns, turns[1:]) if a[0] == "1" and b[0] == "2"]
        if not pairs or count >= max_examples:
            continue
        n = 1
        for p in personas["2"]:
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
    ap.add_argument("--turns", type=int, default=4, help="training contexts keep 1..turns turns")
    ap.add_argument("--spc-repeat", type=int, default=3, help="copies of the SPC train pairs")
    ap.add_argument("--valid-examples", type=int, default=300)
    ap.add_argument("--test-examples", type=int, default=2000)
    ap.add_argument("--spc-test-examples", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    # One generator per output, so changing one output's recipe leaves the others as they were.
    rng = lambda name: random.Random(f"{a.seed}/{name}")
    OUT.mkdir(parents=True, exist_ok=True)
    chat = chitchat_dialogues()
    r = rng("chitchat-train")
    train = []
    for d in chat["train"]:
        for i in range(1, len(d)):
            k = r.randint(1, a.turns)
            train.append({"context": d[max(0, i - k):i], "response": d[i]})
    n_chat = len(train)
    write_jsonl(OUT / "valid20.jsonl", with_candidates(pairs_of(chat["valid"], EVAL_TURNS), a.valid_examples, rng("chitchat-valid")))
    # A larger valid set for choosing between close models: the 300 above (scored at every
    # checkpoint, so kept small) have a standard error of about 0.028 on R@1.
    write_jsonl(OUT / "chitchat-valid2000.jsonl", with_candidates(pairs_of(chat["valid"], EVAL_TURNS), 2000, rng("chitchat-valid-large")))
    write_jsonl(OUT / "chitchat-test20.jsonl", with_candidates(pairs_of(chat["test"], EVAL_TURNS), a.test_examples, rng("chitchat-test")))
    msg = f"chitchat dialogues per split { {k: len(v) for k, v in chat.items()} }; {n_chat} chitchat train pairs"
    if SPC.exists():
        convs = spc_conversations()
        split = {"train": [], "valid": [], "test": []}
        for c in convs:
            split[split_of(c[0], test=2, valid=1)].append(c)
        spc_train = spc_train_pairs(split["train"], rng("spc-train"), a.turns, a.spc_repeat)
        train += spc_train
        text, n_valid = spc_convai2(split["valid"], rng("spc-valid"), a.valid_examples)
        (OUT / "spc-valid20.txt").write_text(text, encoding="utf-8")
        text, n_test = spc_convai2(split["test"], rng("spc-test"), a.spc_test_examples)
        (OUT / "spc-test20.txt").write_text(text, encoding="utf-8")
        msg += (f"; SPC conversations per split { {k: len(v) for k, v in split.items()} }, "
                f"{len(spc_train)} SPC train pairs ({a.spc_repeat} copies), {n_valid} valid / {n_test} test examples")
    rng("shuffle").shuffle(train)
    write_jsonl(OUT / "train.jsonl", train)
    print(msg + f"; {len(train)} train pairs in all")


if __name__ == "__main__":
    main()
