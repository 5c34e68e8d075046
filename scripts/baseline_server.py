"""The Python service a user would write instead of polyrank: FastAPI + uvicorn, PyTorch
eager, the same weights, head and pool vectors, the same math (codes attention over the
context's token outputs, candidate attention over the codes, top-k).

usage: baseline_server.py --model DIR --pool-cache FILE --ids FILE --port PORT
The pool vectors are read from polyrank's cache file, so both services score identical data.
Benchmark-only: no validation beyond what FastAPI does.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--pool-cache", required=True)
ap.add_argument("--ids", required=True)
ap.add_argument("--port", type=int, required=True)
args = ap.parse_args()

settings = json.load(open(os.path.join(args.model, "polyrank.json")))
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.truncation_side = "left"  # keep the latest turns
# fp32 whatever the checkpoint stores (the default model keeps fp16 weights), as polyrank does.
model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
codes = load_file(os.path.join(args.model, "poly_head.safetensors"))["codes"]
raw = np.fromfile(args.pool_cache, dtype=np.uint8)
n, d = (int(x) for x in np.frombuffer(raw[40:56].tobytes(), dtype="<u8"))
pool = torch.from_numpy(np.frombuffer(raw[56:56 + n * d * 4].tobytes(), dtype="<f4").reshape(n, d).copy())
ids = [line.rstrip("\n") for line in open(args.ids, encoding="utf-8")]
assert len(ids) == n

app = FastAPI()


class RankRequest(BaseModel):
    context: str | list[str]
    top_k: int = 10


@app.post("/rank")
def rank(req: RankRequest):
    text = req.context if isinstance(req.context, str) else settings["turn_delimiter"].join(req.context)
    with torch.inference_mode():
        enc = tokenizer(text, truncation=True, max_length=settings["max_context_tokens"], return_tensors="pt")
        h = model(**enc).last_hidden_state[0]                 # [n, d]
        y = torch.softmax(codes @ h.T, dim=-1) @ h            # [m, d] codes attend over tokens
        s = pool @ y.T                                        # [N, m]
        scores = (torch.softmax(s, dim=-1) * s).sum(-1)       # candidate attends over codes, · c
        top = torch.topk(scores, min(req.top_k, n))
    return {"results": [{"id": ids[i], "score": float(v)} for v, i in zip(top.values.tolist(), top.indices.tolist())]}


@app.get("/health/ready")
def ready():
    return {"status": "ready"}


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
