//! Limits on a candidate's `meta`: keys (at every level), nesting depth, serialised bytes and
//! string length. New writes over a limit are refused (422, naming the limit); meta already
//! stored over them (a store written by an older version, or seed files) is kept, and only
//! its fields within the limits are indexed (`filter::MetaIndex`).
//!
//! Why limits at all: before them, one `POST /candidates` of a single candidate whose meta had
//! 100,000 keys (1.68 MB, under the body limit) cost ~165 MB of resident memory, since every
//! key became its own index entry; twenty of them took the process from 0.9 to 4.2 GB.

use serde_json::Value;

/// The limits, from the settings (`max_meta_keys`, `max_meta_depth`, `max_meta_bytes`,
/// `max_meta_string_chars`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLimits {
    /// Object keys in one candidate's meta, all levels counted.
    pub keys: usize,
    /// Nesting depth: the meta object itself is depth 1.
    pub depth: usize,
    /// The meta serialised as compact JSON, in bytes.
    pub bytes: usize,
    /// Longest string, key or value, in characters.
    pub string_chars: usize,
}

impl Default for MetaLimits {
    /// What `config/default.toml` ships (tests and tools that build a pool without settings).
    fn default() -> Self {
        MetaLimits { keys: 64, depth: 4, bytes: 8192, string_chars: 1024 }
    }
}

/// The first limit a meta breaks, as a sentence naming the setting; `what` names the meta
/// (`candidates[3].meta`).
pub fn violation(what: &str, meta: &Value, l: &MetaLimits) -> Option<String> {
    let mut keys = 0usize;
    if let Some(e) = walk(meta, 1, &mut keys, l) {
        return Some(format!("{what}: {e}"));
    }
    // Keys, depth and strings are within their limits here, so this serialisation is bounded
    // by the request body (already under body_limit_bytes).
    let bytes = serde_json::to_vec(meta).map(|v| v.len()).unwrap_or(usize::MAX);
    (bytes > l.bytes).then(|| format!("{what} is {bytes} bytes as JSON; the limit is {} (max_meta_bytes)", l.bytes))
}

/// Depth-first, stopping at the first fault (a meta of 100,000 keys is refused after 65).
fn walk(v: &Value, depth: usize, keys: &mut usize, l: &MetaLimits) -> Option<String> {
    let string = |s: &str| {
        let n = s.chars().count();
        (n > l.string_chars).then(|| format!("a string of {n} characters; the limit is {} (max_meta_string_chars)", l.string_chars))
    };
    match v {
        Value::String(s) => string(s),
        Value::Array(_) | Value::Object(_) if depth > l.depth => {
            Some(format!("nested deeper than {} levels (max_meta_depth; the meta object is level 1)", l.depth))
        }
        Value::Array(items) => items.iter().find_map(|i| walk(i, depth + 1, keys, l)),
        Value::Object(map) => {
            for (k, v) in map {
                *keys += 1;
                if *keys > l.keys {
                    return Some(format!("more than {} keys (max_meta_keys; keys at every level count)", l.keys));
                }
                if let Some(e) = string(k).map(|e| format!("a key is {e}")).or_else(|| walk(v, depth + 1, keys, l)) {
                    return Some(e);
                }
            }
            None
        }
        _ => None,
    }
}
