//! Metadata filters for /rank and the index that answers them without scanning the pool.
//!
//! A filter is an object of field conditions, all of which must hold (AND): `"lang": "en"`
//! (equality on a string, number or bool), `"tier": {"$in": [1, 2]}`, `"price": {"$gte": 5,
//! "$lte": 20}` (numbers), `"$eq"` spelled out. Only top-level scalar meta fields are indexed
//! and matched; a candidate without the field never matches.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A scalar meta value as an index key; numbers compare as f64 (1 and 1.0 are equal).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    S(String),
    N(u64),
    B(bool),
}

fn num_key(x: f64) -> u64 {
    // -0.0 and 0.0 are one value.
    if x == 0.0 { 0f64.to_bits() } else { x.to_bits() }
}

fn key(v: &Value) -> Option<Key> {
    match v {
        Value::String(s) => Some(Key::S(s.clone())),
        Value::Bool(b) => Some(Key::B(*b)),
        Value::Number(n) => n.as_f64().map(|x| Key::N(num_key(x))),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Ord64(f64);
impl Eq for Ord64 {}
impl PartialOrd for Ord64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ord64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

#[derive(Debug, Clone)]
enum Cond {
    In(Vec<Key>),
    Range { gte: Option<f64>, lte: Option<f64> },
}

/// A parsed filter: (field, condition) pairs, all of which must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter(Vec<(String, Cond)>);

impl Filter {
    /// Parses the JSON filter; the error says which field and why.
    pub fn parse(v: &Value) -> Result<Filter, String> {
        let Value::Object(fields) = v else { return Err("filter must be an object of meta fields".into()) };
        let mut conds = Vec::new();
        for (field, spec) in fields {
            let scalar = |v: &Value, what: &str| key(v).ok_or_else(|| format!("filter.{field}: {what} must be a string, number or boolean"));
            let number = |v: &Value, op: &str| v.as_f64().ok_or_else(|| format!("filter.{field}: {op} needs a number"));
            match spec {
                Value::Object(ops) => {
                    if ops.is_empty() {
                        return Err(format!("filter.{field}: empty condition"));
                    }
                    let (mut gte, mut lte) = (None, None);
                    for (op, arg) in ops {
                        match op.as_str() {
                            "$eq" => conds.push((field.clone(), Cond::In(vec![scalar(arg, "$eq")?]))),
                            "$in" => {
                                let Value::Array(items) = arg else { return Err(format!("filter.{field}: $in needs an array")) };
                                let keys = items.iter().map(|i| scalar(i, "each $in value")).collect::<Result<_, _>>()?;
                                conds.push((field.clone(), Cond::In(keys)));
                            }
                            "$gte" => gte = Some(number(arg, "$gte")?),
                            "$lte" => lte = Some(number(arg, "$lte")?),
                            other => return Err(format!("filter.{field}: unsupported operator `{other}` (use $eq, $in, $gte, $lte)")),
                        }
                    }
                    if gte.is_some() || lte.is_some() {
                        conds.push((field.clone(), Cond::Range { gte, lte }));
                    }
                }
                v => conds.push((field.clone(), Cond::In(vec![scalar(v, "the value")?]))),
            }
        }
        Ok(Filter(conds))
    }

    /// No conditions: every candidate passes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a candidate's meta passes every condition (the definition the index follows).
    pub fn matches(&self, meta: Option<&Value>) -> bool {
        self.0.iter().all(|(field, cond)| {
            let Some(v) = meta.and_then(|m| m.get(field)) else { return false };
            match cond {
                Cond::In(keys) => key(v).is_some_and(|k| keys.contains(&k)),
                Cond::Range { gte, lte } => {
                    v.as_f64().is_some_and(|x| gte.is_none_or(|g| x >= g) && lte.is_none_or(|l| x <= l))
                }
            }
        })
    }
}

/// Per meta field: exact values → ids, and numbers in order → ids. Keyed by id, not row,
/// so moving rows (deletes compact the matrix) leaves it untouched.
#[derive(Default)]
pub struct MetaIndex {
    eq: HashMap<String, HashMap<Key, HashSet<String>>>,
    num: HashMap<String, BTreeMap<Ord64, HashSet<String>>>,
}

fn scalars(meta: Option<&Value>) -> impl Iterator<Item = (&String, &Value)> {
    meta.and_then(Value::as_object).into_iter().flatten().filter(|(_, v)| key(v).is_some())
}

impl MetaIndex {
    pub fn add(&mut self, id: &str, meta: Option<&Value>) {
        for (field, v) in scalars(meta) {
            self.eq.entry(field.clone()).or_default().entry(key(v).unwrap()).or_default().insert(id.to_string());
            if let Some(x) = v.as_f64() {
                self.num.entry(field.clone()).or_default().entry(Ord64(x)).or_default().insert(id.to_string());
            }
        }
    }

    pub fn remove(&mut self, id: &str, meta: Option<&Value>) {
        for (field, v) in scalars(meta) {
            if let Some(m) = self.eq.get_mut(field) {
                let k = key(v).unwrap();
                if let Some(set) = m.get_mut(&k) {
                    set.remove(id);
                    if set.is_empty() {
                        m.remove(&k);
                    }
                }
            }
            if let (Some(x), Some(m)) = (v.as_f64(), self.num.get_mut(field)) {
                if let Some(set) = m.get_mut(&Ord64(x)) {
                    set.remove(id);
                    if set.is_empty() {
                        m.remove(&Ord64(x));
                    }
                }
            }
        }
    }

    /// Ids that may match: those of the most selective condition, read from the index. The
    /// caller checks the other conditions on these few with `Filter::matches`.
    pub fn candidates<'a>(&'a self, f: &Filter) -> Vec<&'a str> {
        let mut best: Option<Vec<&'a str>> = None;
        for (field, cond) in &f.0 {
            let ids: Vec<&str> = match cond {
                Cond::In(keys) => {
                    let Some(m) = self.eq.get(field) else { return Vec::new() };
                    keys.iter().filter_map(|k| m.get(k)).flatten().map(String::as_str).collect()
                }
                Cond::Range { gte, lte } => {
                    let Some(m) = self.num.get(field) else { return Vec::new() };
                    let lo = std::ops::Bound::Included(Ord64(gte.unwrap_or(f64::NEG_INFINITY)));
                    let hi = std::ops::Bound::Included(Ord64(lte.unwrap_or(f64::INFINITY)));
                    if gte.zip(*lte).is_some_and(|(g, l)| g > l) {
                        return Vec::new();
                    }
                    m.range((lo, hi)).flat_map(|(_, s)| s).map(String::as_str).collect()
                }
            };
            if best.as_ref().is_none_or(|b| ids.len() < b.len()) {
                best = Some(ids);
            }
        }
        let mut ids = best.unwrap_or_default();
        // $in may list one value twice.
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
