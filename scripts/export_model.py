"""Copies a fine-tuned checkpoint into a committed model directory with fp16 weights.

Usage: export_model.py SRC DST. Writes DST/{config.json, tokenizer.json, model.safetensors
(fp16), polyrank.json, poly_head.safetensors (fp32, small)}; optimizer state and training logs
stay behind. Checks that fp16 storage moves the encoder's outputs (token outputs and
mean-pooled normalised vectors, on 64 varied texts, loaded back into fp32 as polyrank does)
by at most 1e-3, and fails otherwise.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertModel

TEXTS = [
    "hi! how are you?", "what is your favourite food?", "I love pizza, especially with mushrooms.",
    "your persona: i like to ski.\nyour persona: i have two dogs.\nhello, what do you do?",
    "Ça va très bien, merci ! 東京は晴れです 🙂", "12345 67890", "the " * 60,
] + [f"sentence number {i} about topic {i * 7 % 13}" for i in range(57)]


def outputs(cfg, weights, tok):
    model = BertModel(cfg, add_pooling_layer=False)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    model.eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return h * m, pooled


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    half = {k: v.half().contiguous() for k, v in weights.items()}
    cfg = BertConfig.from_json_file(str(src / "config.json"))
    tok = AutoTokenizer.from_pretrained(str(src))
    h32, p32 = outputs(cfg, weights, tok)
    h16, p16 = outputs(cfg, half, tok)
    dh, dp = (h32 - h16).abs().max().item(), (p32 - p16).abs().max().item()
    print(f"fp16 storage: max abs diff token outputs {dh:.2e}, pooled vectors {dp:.2e}")
    if dp > 1e-3:
        sys.exit(f"fp16 storage changes pooled outputs by {dp:.2e} > 1e-3: keep fp32")
    for name in ("config.json", "tokenizer.json", "polyrank.json", "poly_head.safetensors"):
        if (src / name).exists():
            target = dst / name
            if target.is_symlink():
                target.unlink()
            shutil.copyfile(src / name, target)
    target = dst / "model.safetensors"
    if target.is_symlink():
        target.unlink()
    save_file(half, str(target), metadata={"format": "pt"})
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
