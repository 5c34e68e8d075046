"""Copies a fine-tuned checkpoint into a committed model directory with fp16 weights.

Usage: export_model.py SRC DST. Writes DST/{config.json, tokenizer.json, model.safetensors
(fp16), polyrank.json, poly_head.safetensors (fp32, small)} and, for separate encoders,
DST/candidate_encoder/{config.json, model.safetensors (fp16)}; optimizer state and training
logs stay behind. Checks, for each encoder, that fp16 storage moves its mean-pooled
normalised vectors (64 varied texts, weights loaded back into fp32 as polyrank does) by at
most 1e-3, and fails otherwise; the token outputs' change is printed too.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

TEXTS = [
    "hi! how are you?", "what is your favourite food?", "I love pizza, especially with mushrooms.",
    "your persona: i like to ski.\nyour persona: i have two dogs.\nhello, what do you do?",
    "Ça va très bien, merci ! 東京は晴れです 🙂", "12345 67890", "the " * 60,
] + [f"sentence number {i} about topic {i * 7 % 13}" for i in range(57)]


def outputs(cfg, weights, tok):
    model = BertModel(cfg, add_pooling_layer=False)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    model.eval()
    encs = tok.encode_batch(TEXTS)
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return h * m, pooled


def export_encoder(src, dst, tok):
    """fp16 copy of one encoder's weights; returns the max abs change of pooled vectors."""
    weights = load_file(str(src / "model.safetensors"))
    half = {k: v.half().contiguous() for k, v in weights.items()}
    cfg = BertConfig.from_json_file(str(src / "config.json"))
    h32, p32 = outputs(cfg, weights, tok)
    h16, p16 = outputs(cfg, half, tok)
    dh, dp = (h32 - h16).abs().max().item(), (p32 - p16).abs().max().item()
    print(f"{src}: fp16 storage changes token outputs by at most {dh:.2e}, pooled vectors by {dp:.2e}")
    if dp > 1e-3:
        sys.exit(f"fp16 storage changes pooled outputs by {dp:.2e} > 1e-3: keep fp32")
    dst.mkdir(parents=True, exist_ok=True)
    copy(src / "config.json", dst / "config.json")
    target = dst / "model.safetensors"
    if target.is_symlink():
        target.unlink()
    save_file(half, str(target), metadata={"format": "pt"})
    return dp


def copy(a, b):
    if b.is_symlink():
        b.unlink()
    shutil.copyfile(a, b)


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    # The file's own padding and truncation (128) are replaced, as polyrank does.
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_truncation(256)
    tok.enable_padding(pad_id=0)
    export_encoder(src, dst, tok)
    if (src / "candidate_encoder").is_dir():
        export_encoder(src / "candidate_encoder", dst / "candidate_encoder", tok)
    for name in ("tokenizer.json", "polyrank.json", "poly_head.safetensors"):
        if (src / name).exists():
            copy(src / name, dst / name)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
