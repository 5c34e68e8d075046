"""Turns `polyrank eval --json` lines (chitchat test first, then SPC test, per model) into the
README's quality table: R@1/20 and MRR with standard errors.

Usage: quality_table.py EVAL.jsonl [EVAL.jsonl ...]; rows in first-seen model order.
Each file holds, for one or more models, the chitchat lines then the SPC lines (as
scripts/eval_table.sh --json writes them); an example count of 2,000 marks chitchat."""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        m = r["metrics"]
        kind = "chitchat" if m["examples"] == 2000 else "spc"
        rows.setdefault(r["model"], {})[kind] = m

fmt = lambda m, k: f"{m[k]:.3f} ± {m[k + '_se']:.3f}" if m else "–"
print("| model | chitchat R@1/20 | chitchat MRR | SPC R@1/20 | SPC MRR |")
print("|---|---|---|---|---|")
for model, d in rows.items():
    c, s = d.get("chitchat"), d.get("spc")
    print(f"| `{model}` | {fmt(c, 'r_at_1')} | {fmt(c, 'mrr')} | {fmt(s, 'r_at_1')} | {fmt(s, 'mrr')} |")
