"""ParlAI 1.7.2 as the reference for `polyrank import parlai` (tests/parlai_parity.rs).

Builds ParlAI dictionaries (subword-nmt BPE and `re`) from real texts, tiny random-weight
poly-encoders and bi-encoders in several variants saved with ParlAI's own `agent.save`, and
writes what ParlAI computes: token ids, context codes (a bi-encoder's one context vector),
candidate vectors, scores, and the top-10 its own agent returns over a fixed candidate file
(`--eval-candidates fixed --encode-candidate-vecs true`).

    python scripts/parlai_reference.py SPEC.json OUT_DIR

SPEC: {"contexts": [[turn, ...], ...], "candidates": [...], "fixed_contexts": [...],
       "n_texts": N, "spc_csv": PATH or null}
The dictionaries are built from, and token ids compared on, real text: the first N distinct
messages of the PyPI `chitchat-dataset` (MIT) and, when the file is there, every persona line of
Synthetic-Persona-Chat's test split (CC-BY-4.0, ../shared/data/spc).
Runs with ParlAI on PYTHONPATH (.venv/parlai-lib, installed by scripts/setup-venv.sh).
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from parlai.agents.transformer.biencoder import BiencoderAgent  # noqa: E402
from parlai.agents.transformer.polyencoder import PolyencoderAgent  # noqa: E402
from parlai.core.agents import create_agent_from_model_file  # noqa: E402
from parlai.core.dict import DictionaryAgent  # noqa: E402
from parlai.core.message import Message  # noqa: E402
from parlai.core.params import ParlaiParser  # noqa: E402

# The variants the parity test covers: every option `polyrank import parlai` converts appears
# in at least one. "paper" is the released Reddit model's recipe, shrunk.
VARIANTS = {
    "paper": dict(dict="bpe_start_end", args=[
        "--variant", "xlm", "--learn-positional-embeddings", "True", "--n-segments", "2",
        "--embeddings-scale", "False", "--activation", "gelu", "--output-scaling", "0.06",
        "--reduction-type", "mean", "--polyencoder-type", "codes", "--poly-n-codes", "8",
        "--poly-attention-type", "basic", "--codes-attention-type", "basic"]),
    "aiayn_first_multihead": dict(dict="bpe", args=[
        "--variant", "aiayn", "--learn-positional-embeddings", "False", "--n-segments", "0",
        "--embeddings-scale", "True", "--activation", "relu", "--reduction-type", "first",
        "--polyencoder-type", "codes", "--poly-n-codes", "6",
        "--codes-attention-type", "multihead", "--codes-attention-num-heads", "2",
        "--poly-attention-type", "sqrt"]),
    "prelayernorm_nfirst_max": dict(dict="re", args=[
        "--variant", "prelayernorm", "--learn-positional-embeddings", "True", "--n-segments", "1",
        "--embeddings-scale", "False", "--activation", "gelu", "--reduction-type", "max",
        "--polyencoder-type", "n_first", "--poly-n-codes", "5",
        "--poly-attention-type", "multihead", "--poly-attention-num-heads", "2"]),
    "xlm_sqrt_codes_multihead_cands": dict(dict="bytelevel", args=[
        "--variant", "xlm", "--learn-positional-embeddings", "True", "--n-segments", "0",
        "--embeddings-scale", "True", "--activation", "relu", "--output-scaling", "0.5",
        "--reduction-type", "mean", "--polyencoder-type", "codes", "--poly-n-codes", "4",
        "--codes-attention-type", "sqrt", "--poly-attention-type", "multihead",
        "--poly-attention-num-heads", "4"]),
    # transformer/biencoder: shared encoders put ParlAI's response wrapper (Linear-ReLU-Linear)
    # on the candidate side; separate ones may have their own word embeddings.
    "biencoder_shared_first": dict(dict="bpe", model="transformer/biencoder", args=[
        "--variant", "xlm", "--learn-positional-embeddings", "True", "--n-segments", "2",
        "--embeddings-scale", "False", "--activation", "gelu", "--output-scaling", "0.5",
        "--reduction-type", "first", "--share-encoders", "True", "--history-size", "2"]),
    "biencoder_separate_mean": dict(dict="bytelevel_noprefix", model="transformer/biencoder", args=[
        "--variant", "aiayn", "--learn-positional-embeddings", "False", "--n-segments", "0",
        "--embeddings-scale", "True", "--activation", "relu", "--reduction-type", "mean",
        "--share-encoders", "False", "--share-word-embeddings", "False"]),
}
AGENTS = {"transformer/polyencoder": PolyencoderAgent, "transformer/biencoder": BiencoderAgent}

DICTS = {
    "bpe_start_end": ["--dict-tokenizer", "bpe", "--dict-lower", "True", "--dict-endtoken", "__start__",
                      "--dict-maxtokens", "3000"],
    "bpe": ["--dict-tokenizer", "bpe", "--dict-lower", "True", "--dict-maxtokens", "2000"],
    "re": ["--dict-tokenizer", "re", "--dict-lower", "False", "--dict-maxtokens", "4000"],
    # HF byte-level BPE; its vocab/merges are trained on the same texts first ({bbpe}).
    "bytelevel": ["--dict-tokenizer", "bytelevelbpe", "--bpe-vocab", "{bbpe}-vocab.json",
                  "--bpe-merge", "{bbpe}-merges.txt"],
    "bytelevel_noprefix": ["--dict-tokenizer", "bytelevelbpe", "--bpe-vocab", "{bbpe}-vocab.json",
                           "--bpe-merge", "{bbpe}-merges.txt", "--bpe-add-prefix-space", "False",
                           "--dict-lower", "True"],
}
DICT_FILES = ("", ".codecs", "-vocab.json", "-merges.txt")

TINY = ["--n-layers", "2", "--n-heads", "2", "--embedding-size", "16", "--ffn-size", "32",
        "--n-positions", "64", "--text-truncate", "40", "--label-truncate", "24",
        "--lr-scheduler", "none", "--dropout", "0", "--attention-dropout", "0", "--relu-dropout", "0",
        "--no-cuda"]


def parse(args, agent=PolyencoderAgent):
    pp = ParlaiParser(True, True)
    agent.add_cmdline_args(pp, partial_opt=None)
    return pp.parse_args(args)


def build_dict(name, path, texts):
    opt = parse(["--dict-file", path] + DICTS[name] + TINY)
    d = DictionaryAgent(opt)
    for t in texts:
        d.add_to_dict(d.tokenize(t))
    d.save(path, sort=True)
    return opt


def pad(vecs, null):
    n = max(len(v) for v in vecs)
    out = torch.full((len(vecs), n), null, dtype=torch.long)
    for i, v in enumerate(vecs):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
    return out


def real_texts(n, spc_csv):
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    seen, texts = set(), []
    for key in sorted(data):
        for turn in data[key]["messages"]:
            text = " ".join(u["text"] for u in turn)
            if text not in seen and len(texts) < n:
                seen.add(text)
                texts.append(text)
    if spc_csv and os.path.exists(spc_csv):
        import csv

        with open(spc_csv, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                for cell in row[:2]:
                    for line in cell.split("\n"):
                        if line.strip() and line not in seen and not line.startswith("user "):
                            seen.add(line)
                            texts.append(line)
    return texts


def main(spec_path, out):
    spec = json.load(open(spec_path))
    os.makedirs(out, exist_ok=True)
    texts = real_texts(spec["n_texts"], spec.get("spc_csv"))
    # A byte-level BPE vocabulary of the texts, as a user brings one (`--bpe-vocab`).
    from tokenizers import ByteLevelBPETokenizer

    bbpe = ByteLevelBPETokenizer()
    bbpe.train_from_iterator(texts, vocab_size=1500, min_frequency=2, show_progress=False)
    bbpe.save_model(out, "bbpe")
    for name, args in DICTS.items():
        DICTS[name] = [a.replace("{bbpe}", os.path.join(out, "bbpe")) for a in args]
    dict_paths = {}
    for name in DICTS:
        path = os.path.join(out, f"dict-{name}", "model.dict")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        build_dict(name, path, texts)
        d = DictionaryAgent(parse(["--dict-file", path] + DICTS[name] + TINY))
        json.dump({"texts": texts, "ids": [d.txt2vec(t) for t in texts], "size": len(d)},
                  open(os.path.join(out, f"tokens-{name}.json"), "w"))
        dict_paths[name] = path

    cand_file = os.path.join(out, "fixed_candidates.txt")
    with open(cand_file, "w") as f:
        f.write("\n".join(spec["candidates"]) + "\n")

    torch.manual_seed(0)
    for name, v in VARIANTS.items():
        vdir = os.path.join(out, name)
        os.makedirs(vdir, exist_ok=True)
        model_file = os.path.join(vdir, "model")
        src_dict = dict_paths[v["dict"]]
        for suffix in DICT_FILES:
            if os.path.exists(src_dict + suffix):
                with open(src_dict + suffix, "rb") as s, open(model_file + ".dict" + suffix, "wb") as t:
                    t.write(s.read())
        kind = v.get("model", "transformer/polyencoder")
        opt = parse(["--model", kind, "--model-file", model_file,
                     "--dict-file", model_file + ".dict"] + DICTS[v["dict"]] + TINY + v["args"], AGENTS[kind])
        agent = AGENTS[kind](opt)
        # Every parameter random (LayerNorm and biases too), so no mapping passes by identity.
        with torch.no_grad():
            for p in agent.model.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        agent.model.eval()
        agent.save(model_file)

        model = agent.model
        null = agent.NULL_IDX
        ctx_vecs = []
        for turns in spec["contexts"]:
            agent.history.reset()
            for t in turns:
                agent.history.update_history(Message({"text": t}))
            obs = agent._set_text_vec(Message({"text": turns[-1]}), agent.history, agent.text_truncate)
            ctx_vecs.append(obs["text_vec"].tolist())
        cand_vecs = [c.tolist() for c in agent.vectorize_fixed_candidates(spec["candidates"], add_start=True, add_end=True)]
        b = len(ctx_vecs)
        with torch.no_grad():
            if kind == "transformer/polyencoder":
                ctxt_rep, ctxt_mask, _ = model(ctxt_tokens=pad(ctx_vecs, null))
                # One candidate at a time: vectors that do not depend on a batch's padding
                # (ParlAI's max and prelayernorm+mean reductions see the padding; polyrank's
                # do not).
                cand_rep = torch.cat([model(cand_tokens=torch.as_tensor([[c]]))[2][0] for c in cand_vecs], 0)
                scores = model(ctxt_rep=ctxt_rep, ctxt_rep_mask=ctxt_mask,
                               cand_rep=cand_rep.unsqueeze(0).expand(b, -1, -1).contiguous())
            else:
                # TransformerMemNetModel without memories, as the agent scores fixed candidates:
                # the context encoder's vector against `encode_cand`'s, by dot product.
                context_h, _ = model(xs=pad(ctx_vecs, null), mems=None, cands=None)
                cand_rep = torch.cat([model.encode_cand(torch.as_tensor([c])) for c in cand_vecs], 0)
                scores = agent._score(context_h, cand_rep)
                ctxt_rep, ctxt_mask = context_h.unsqueeze(1), torch.ones(b, 1, dtype=torch.bool)
        ref = {"context_ids": ctx_vecs, "candidate_ids": cand_vecs,
               "ctxt_rep": ctxt_rep.tolist(), "ctxt_mask": ctxt_mask.int().tolist(),
               "cand_rep": cand_rep.tolist(), "scores": scores.tolist()}

        # ParlAI's own ranking over the fixed candidate file, as `interactive.py` serves it.
        ranker = create_agent_from_model_file(model_file, {
            "eval_candidates": "fixed", "fixed_candidates_path": cand_file,
            "encode_candidate_vecs": True, "no_cuda": True, "interactive_mode": False})
        top = []
        for text in spec["fixed_contexts"]:
            ranker.reset()
            ranker.observe(Message({"text": text, "episode_done": True}))
            reply = ranker.act()
            top.append(list(reply["text_candidates"][:10]))
        ref["fixed_top10"] = top
        json.dump(ref, open(os.path.join(vdir, "reference.json"), "w"))
        print(f"{name}: saved {model_file}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
