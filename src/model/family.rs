//! HF encoder families that are BERT's blocks under other names (`bert.rs`): their
//! `config.json` keys and checkpoint tensor names, mapped to BERT's once at load time so the
//! blocks stay one implementation. The tables follow HF's `modeling_distilbert.py` and
//! `modeling_mpnet.py`; `tests/hf_families.rs` checks each family against `transformers`.

use serde_json::{json, Value};

/// A family's own names for BERT's per-layer blocks (after `encoder.layer.N.` /
/// `transformer.layer.N.`), as (family, BERT) pairs.
const DISTILBERT_LAYER: [(&str, &str); 8] = [
    ("attention.q_lin.", "attention.self.query."),
    ("attention.k_lin.", "attention.self.key."),
    ("attention.v_lin.", "attention.self.value."),
    ("attention.out_lin.", "attention.output.dense."),
    ("sa_layer_norm.", "attention.output.LayerNorm."),
    ("ffn.lin1.", "intermediate.dense."),
    ("ffn.lin2.", "output.dense."),
    ("output_layer_norm.", "output.LayerNorm."),
];
const MPNET_LAYER: [(&str, &str); 5] = [
    ("attention.attn.q.", "attention.self.query."),
    ("attention.attn.k.", "attention.self.key."),
    ("attention.attn.v.", "attention.self.value."),
    ("attention.attn.o.", "attention.output.dense."),
    ("attention.LayerNorm.", "attention.output.LayerNorm."),
];

/// `config.json` as BERT's keys: DistilBERT's `dim`, `n_layers`, … renamed (its LayerNorms
/// use 1e-12, fixed in HF's code); DistilBERT and MPNet have no token types; MPNet's bucket
/// count defaults as HF's config does. A config already in BERT's keys (one `polyrank train`
/// copied) is left as it is.
pub(crate) fn bert_config_keys(mut value: Value) -> Value {
    let Some(obj) = value.as_object_mut() else { return value };
    let family = obj.get("model_type").and_then(Value::as_str).unwrap_or("bert").to_string();
    if family == "distilbert" {
        for (from, to) in [("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"), ("hidden_dim", "intermediate_size"), ("activation", "hidden_act")] {
            if let Some(v) = obj.remove(from) {
                obj.entry(to).or_insert(v);
            }
        }
        obj.entry("layer_norm_eps").or_insert(json!(1e-12));
    }
    if family == "distilbert" || family == "mpnet" {
        obj.insert("type_vocab_size".into(), json!(0));
    }
    if family == "mpnet" {
        obj.entry("relative_attention_num_buckets").or_insert(json!(32));
    } else {
        obj.remove("relative_attention_num_buckets");
    }
    value
}

/// A checkpoint tensor's name as the BERT blocks' variable (None: the name is BERT's already).
pub(crate) fn bert_name(model_type: Option<&str>, name: &str) -> Option<String> {
    let (table, layers): (&[(&str, &str)], &str) = match model_type {
        Some("distilbert") => (&DISTILBERT_LAYER, "transformer.layer."),
        Some("mpnet") => (&MPNET_LAYER, "encoder.layer."),
        _ => return None,
    };
    let rest = name.strip_prefix(layers)?;
    let (index, inner) = rest.split_once('.')?;
    let (from, to) = table.iter().find(|(from, _)| inner.starts_with(from))?;
    Some(format!("encoder.layer.{index}.{to}{}", &inner[from.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_names_map_to_berts_and_berts_stay() {
        let d = Some("distilbert");
        assert_eq!(bert_name(d, "transformer.layer.3.attention.q_lin.weight").as_deref(), Some("encoder.layer.3.attention.self.query.weight"));
        assert_eq!(bert_name(d, "transformer.layer.0.output_layer_norm.bias").as_deref(), Some("encoder.layer.0.output.LayerNorm.bias"));
        assert_eq!(bert_name(d, "encoder.layer.0.output.LayerNorm.bias"), None);
        assert_eq!(bert_name(d, "embeddings.LayerNorm.weight"), None);
        let m = Some("mpnet");
        assert_eq!(bert_name(m, "encoder.layer.11.attention.attn.o.weight").as_deref(), Some("encoder.layer.11.attention.output.dense.weight"));
        assert_eq!(bert_name(m, "encoder.layer.1.attention.LayerNorm.weight").as_deref(), Some("encoder.layer.1.attention.output.LayerNorm.weight"));
        assert_eq!(bert_name(m, "encoder.layer.1.attention.output.LayerNorm.weight"), None);
        assert_eq!(bert_name(m, "encoder.relative_attention_bias.weight"), None);
        assert_eq!(bert_name(Some("bert"), "encoder.layer.1.attention.attn.q.weight"), None);
    }

    #[test]
    fn distilbert_config_reads_as_berts() {
        let v = bert_config_keys(json!({"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "activation": "gelu", "vocab_size": 9, "max_position_embeddings": 16}));
        assert_eq!(v["hidden_size"], 32);
        assert_eq!(v["intermediate_size"], 64);
        assert_eq!(v["type_vocab_size"], 0);
        assert!(v.get("dim").is_none());
        let b = bert_config_keys(json!({"model_type": "bert", "relative_attention_num_buckets": 32}));
        assert!(b.get("relative_attention_num_buckets").is_none() && b.get("type_vocab_size").is_none());
    }
}
