"""Reference candidate embeddings from sentence-transformers (independent of polyrank).

usage: st_reference.py MODEL_DIR TEXTS_JSON OUT_JSON
Reads a JSON list of strings, writes a JSON list of normalised embeddings.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from sentence_transformers import SentenceTransformer  # noqa: E402

model_dir, texts_path, out_path = sys.argv[1:4]
model = SentenceTransformer(model_dir, device="cpu")
texts = json.load(open(texts_path, encoding="utf-8"))
vectors = model.encode(texts, batch_size=16, normalize_embeddings=False, convert_to_numpy=True)
json.dump([[float(x) for x in v] for v in vectors], open(out_path, "w"))
print(f"max_seq_length={model.max_seq_length} modules={[type(m).__name__ for m in model]}", file=sys.stderr)
