"""Plots /rank p50 latency against pool size from `cargo bench --bench serve` results."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results, out = json.load(open(sys.argv[1])), sys.argv[2]
fig, ax = plt.subplots(figsize=(7, 4.5))
for who, style in (("polyrank", "-o"), ("python", "--s")):
    for clients in (1, 8, 32):
        rows = [r for r in results["rank"] if r["clients"] == clients and r[who]["requests"] > 0]
        ax.plot([r["n"] for r in rows], [r[who]["p50_ms"] for r in rows], style, label=f"{who}, {clients} clients")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("candidate pool size N")
ax.set_ylabel("/rank p50 latency (ms)")
ax.set_title(f"/rank latency, m=64, d=384 (sgemm {results['sgemm_gflops']:.0f} GFLOP/s)")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=120)
