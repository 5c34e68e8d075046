"""Plots /rank p50 latency against pool size from `cargo bench --bench serve` results: the
main table (polyrank with `auto` and the Python service at 1, 8 and 32 clients) and, when the
run has it, the scoring-precision axis at 1 client (each precision, the baseline build)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results, out = json.load(open(sys.argv[1])), sys.argv[2]
precision = results.get("precision") or []
fig, axes = plt.subplots(1, 2 if precision else 1, figsize=(13 if precision else 7, 4.5), squeeze=False)
ax = axes[0][0]
for who, style in (("polyrank", "-o"), ("python", "--s")):
    for clients in (1, 8, 32):
        rows = [r for r in results["rank"] if r["clients"] == clients and r[who]["requests"] > 0]
        ax.plot([r["n"] for r in rows], [r[who]["p50_ms"] for r in rows], style, label=f"{who}, {clients} clients")
ax.set_title(f"/rank p50, m=64, d=384 (sgemm {results['sgemm_gflops']:.0f} GFLOP/s)")
if precision:
    px = axes[0][1]
    for name in ("float32", "int8", "bfloat16", "auto", "baseline"):
        rows = [r for r in precision if r["precision"] == name and r["one"]["requests"] > 0]
        if rows:
            label = f"{name} (→ {rows[-1]['chosen']})" if name == "auto" else name
            px.plot([r["n"] for r in rows], [r["one"]["p50_ms"] for r in rows], "-o" if name != "baseline" else "--x", label=label)
    px.set_title("/rank p50 by scoring precision, 1 client")
    ax_list = [ax, px]
else:
    ax_list = [ax]
for a in ax_list:
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("candidate pool size N")
    a.set_ylabel("/rank p50 latency (ms)")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
fig.suptitle(results.get("cpu", ""), fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=120)
