"""Tiny random-weight HF encoders, one per family polyrank serves, saved by `transformers`
itself, and what `transformers` computes for a padded batch (tests/hf_families.rs).

usage: hf_reference.py OUT_DIR
Writes OUT_DIR/<family>/{config.json, model.safetensors, reference.safetensors}; the
reference holds `ids`, `mask` ([B, L], right-padded with the family's padding id) and
`hidden` ([B, L, d], `last_hidden_state`). Every parameter is random (LayerNorm included), so
a block read under the wrong name or a wrong position rule cannot pass.
"""
import sys
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
LENGTHS = [40, 7, 23]  # > MPNet's exact-distance buckets, so its log buckets are used too

# name: (config, model class). Task models (…ForMaskedLM) save their encoder under a prefix
# (`roberta.`, `distilbert.`), as many published checkpoints do.
FAMILIES = {
    "bert": (T.BertConfig(**SIZES, max_position_embeddings=64, type_vocab_size=2), T.BertModel),
    "roberta": (T.RobertaConfig(**SIZES, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1), T.RobertaForMaskedLM),
    "xlm-roberta": (T.XLMRobertaConfig(**SIZES, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, hidden_act="gelu_new"), T.XLMRobertaModel),
    "distilbert": (T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64), T.DistilBertForMaskedLM),
    "distilbert-sinusoidal": (T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, sinusoidal_pos_embds=True, activation="relu"), T.DistilBertModel),
    "mpnet": (T.MPNetConfig(**SIZES, max_position_embeddings=66, pad_token_id=1), T.MPNetModel),
}


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embeddings" in name and getattr(model.config, "sinusoidal_pos_embds", False):
                continue  # fixed sinusoids, as HF made them
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def main():
    out = Path(sys.argv[1])
    for i, (family, (config, cls)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = cls(config).eval()
        randomize(model)
        d = out / family
        model.save_pretrained(d)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        L = max(LENGTHS)
        ids = torch.full((len(LENGTHS), L), pad, dtype=torch.long)
        mask = torch.zeros((len(LENGTHS), L), dtype=torch.long)
        for r, n in enumerate(LENGTHS):
            ids[r, :n] = torch.randint(5, config.vocab_size, (n,))
            mask[r, :n] = 1
        encoder = model.base_model
        with torch.no_grad():
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        save_file({"ids": ids, "mask": mask, "hidden": hidden.contiguous()}, str(d / "reference.safetensors"))
        print(family, cls.__name__, tuple(hidden.shape))


if __name__ == "__main__":
    main()
