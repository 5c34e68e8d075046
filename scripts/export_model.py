"""Copies a fine-tuned checkpoint into a committed model directory with compact weights.

Usage: export_model.py SRC DST [--delta-base BASE [--levels L]]. Writes DST/{config.json,
tokenizer.json, model.safetensors, polyrank.json, poly_head.safetensors (fp32, small)} and, for
separate encoders, DST/candidate_encoder/{config.json, model.safetensors}; optimizer state and
training logs stay behind.

Encoder weights are stored in fp16, or, with --delta-base, as BASE's weights file (kept
byte for byte: a model already in the repository costs nothing more) plus
model.delta.safetensors: per tensor that changed, `N.q` (int8 in [-L, L]) and `N.scale`
(one f32 per row), weight = base + q * scale (see src/model/weights.rs). L = 31 by default:
63 levels, which git's zlib stores in about 6 bits a weight. BASE may be DST itself.

Checks, for each encoder, that storage moves its mean-pooled normalised vectors (64 varied
texts, weights loaded back into fp32 as polyrank does) by at most 1e-3, and fails
otherwise; the token outputs' change is printed too.
"""
import argparse
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


def delta(weights, base, levels):
    """int8 q and per-row scales with base + q * scale ~ weights, for the tensors that changed."""
    out, stored = {}, {}
    for name, w in weights.items():
        b = base[name]
        if b.shape != w.shape:
            sys.exit(f"--delta-base: tensor {name} has shape {list(b.shape)} there, {list(w.shape)} here")
        d = w.float() - b.float()
        if torch.equal(w.half(), b.half()):
            stored[name] = b.float()  # unchanged (a frozen tensor): no delta
            continue
        peak = d.abs().amax(dim=1, keepdim=True) if d.dim() == 2 else d.abs().max().reshape(1)
        scale = (peak / levels).clamp_min(1e-12).float()
        q = torch.round(d / scale).clamp(-levels, levels).to(torch.int8)
        out[f"{name}.q"], out[f"{name}.scale"] = q.contiguous(), scale.contiguous()
        stored[name] = b.float() + q.float() * scale
    return out, stored


def export_encoder(src, dst, tok, base_dir, levels):
    """Compact copy of one encoder's weights; returns the max abs change of pooled vectors."""
    weights = load_file(str(src / "model.safetensors"))
    cfg = BertConfig.from_json_file(str(src / "config.json"))
    if base_dir is None:
        how = "fp16 storage"
        stored = {k: v.half().contiguous() for k, v in weights.items()}
    else:
        how = f"base + int8 delta (L={levels})"
        if (base_dir / "model.delta.safetensors").exists():
            sys.exit(f"--delta-base {base_dir} has a delta itself: give a base stored whole")
        base = load_file(str(base_dir / "model.safetensors"))
        dq, stored = delta(weights, base, levels)
    h32, p32 = outputs(cfg, weights, tok)
    hs, ps = outputs(cfg, stored, tok)
    dh, dp = (h32 - hs).abs().max().item(), (p32 - ps).abs().max().item()
    print(f"{src}: {how} changes token outputs by at most {dh:.2e}, pooled vectors by {dp:.2e}")
    if dp > 1e-3:
        sys.exit(f"{how} changes pooled outputs by {dp:.2e} > 1e-3: keep fp32")
    dst.mkdir(parents=True, exist_ok=True)
    copy(src / "config.json", dst / "config.json")
    target, delta_file = dst / "model.safetensors", dst / "model.delta.safetensors"
    if delta_file.exists() or delta_file.is_symlink():
        delta_file.unlink()
    if base_dir is None:
        if target.is_symlink():
            target.unlink()
        save_file(stored, str(target), metadata={"format": "pt"})
    else:
        if not (target.exists() and target.resolve() == (base_dir / "model.safetensors").resolve()):
            copy(base_dir / "model.safetensors", target)
        save_file(dq, str(delta_file), metadata={"format": "pt"})  # one key: byte-reproducible
    return dp


def copy(a, b):
    if b.is_symlink():
        b.unlink()
    shutil.copyfile(a, b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--delta-base", type=Path, help="a model directory whose encoder weights to keep as the base")
    ap.add_argument("--levels", type=int, default=31, help="int8 delta range [-L, L] (1..127)")
    ap.add_argument("--description", help="replaces polyrank.json's description (what /info shows)")
    a = ap.parse_args()
    if not 1 <= a.levels <= 127:
        sys.exit("--levels must be in 1..127")
    src, dst = a.src, a.dst
    dst.mkdir(parents=True, exist_ok=True)
    # The file's own padding and truncation (128) are replaced, as polyrank does.
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_truncation(256)
    tok.enable_padding(pad_id=0)
    base = a.delta_base
    export_encoder(src, dst, tok, base, a.levels)
    if (src / "candidate_encoder").is_dir():
        cbase = None if base is None else base / "candidate_encoder"
        export_encoder(src / "candidate_encoder", dst / "candidate_encoder", tok, cbase, a.levels)
    for name in ("tokenizer.json", "polyrank.json", "poly_head.safetensors"):
        if (src / name).exists():
            copy(src / name, dst / name)
    if a.description:
        settings = json.loads((dst / "polyrank.json").read_text())
        settings["description"] = a.description
        (dst / "polyrank.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
