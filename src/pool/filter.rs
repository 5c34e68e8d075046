//! Metadata filters for /rank and the index that answers them without scanning the pool.
//!
//! A filter is an object of field conditions, all of which must hold (AND): `"lang": "en"`
//! (equality on a string, number or bool), `"tier": {"$in": [1, 2]}`, `"price": {"$gte": 5,
//! "$lte": 20}` (numbers), `"$eq"` spelled out. Only top-level scalar meta fields are indexed
//! and matched; a candidate without the field never matches.

use super::meta::MetaLimits;
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
///
/// Bounded: a candidate is indexed only when its top-level scalar fields are all within the
/// meta limits (`meta::MetaLimits`: count, key and string length) and its entries fit the
/// byte budget (`max_meta_index_bytes`); otherwise its id goes to `unindexed`, and every
/// filter checks those few candidates directly (`Filter::matches` on their meta), so results
/// are the same either way. Removing a candidate removes its entries and any value or field
/// map left empty: deletes and replacements give back what upserts took.
pub struct MetaIndex {
    eq: HashMap<String, HashMap<Key, HashSet<String>>>,
    num: HashMap<String, BTreeMap<Ord64, HashSet<String>>>,
    unindexed: HashSet<String>,
    limits: MetaLimits,
    max_bytes: usize,
    /// Estimated heap bytes of everything above (see the costs below).
    bytes: usize,
}

/// What /info and the gauge report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexStats {
    /// Estimated heap bytes of the index (entries, and the ids of unindexed candidates).
    pub bytes: usize,
    pub max_bytes: usize,
    /// Distinct indexed fields.
    pub fields: usize,
    /// Candidates whose meta is not indexed (over the limits, or past the budget): filters
    /// check them one by one.
    pub unindexed: usize,
}

// Estimated heap bytes per index part, beyond the strings' own bytes: a field's map (its slot
// in the outer table, which doubles as it grows, the field name's allocation, the inner
// table's first allocation), a value's set (key, set header, first table), an id in a set
// (String header, table slot, control byte, allocator rounding). Numbers are indexed twice
// (by value and in order). Measured (tests/hardening.rs, tiny model): 1,020 candidates of 64
// new ~100-character numeric fields each took 138 MB of resident memory, of which ~12 MB is
// the meta itself; this estimate says 126 MB (an earlier 384-byte field cost said 92 MB).
const FIELD_COST: usize = 640;
const VALUE_COST: usize = 160;
const ID_COST: usize = 48;

fn key_bytes(k: &Key) -> usize {
    match k {
        Key::S(s) => s.len(),
        _ => 0,
    }
}

/// A candidate's top-level scalar fields, when they may all be indexed: at most `keys` of
/// them, names and string values within `string_chars`. `None` when any is over.
fn indexable<'a>(meta: Option<&'a Value>, l: &MetaLimits) -> Option<Vec<(&'a String, &'a Value)>> {
    let fields: Vec<(&String, &Value)> = meta.and_then(Value::as_object).into_iter().flatten().filter(|(_, v)| key(v).is_some()).collect();
    let long = |s: &str| s.chars().count() > l.string_chars;
    let over = fields.len() > l.keys || fields.iter().any(|(f, v)| long(f) || v.as_str().is_some_and(long));
    (!over).then_some(fields)
}

impl MetaIndex {
    pub fn new(limits: MetaLimits, max_bytes: usize) -> Self {
        MetaIndex { eq: HashMap::new(), num: HashMap::new(), unindexed: HashSet::new(), limits, max_bytes, bytes: 0 }
    }

    pub fn limits(&self) -> MetaLimits {
        self.limits
    }

    pub fn stats(&self) -> IndexStats {
        let fields = self.eq.len();
        IndexStats { bytes: self.bytes, max_bytes: self.max_bytes, fields, unindexed: self.unindexed.len() }
    }

    pub fn add(&mut self, id: &str, meta: Option<&Value>) {
        let fields = match indexable(meta, &self.limits) {
            Some(f) if self.bytes + Self::most(id, &f) <= self.max_bytes => f,
            // Over a limit or past the budget: checked directly by every filter.
            Some(f) if f.is_empty() => return,
            _ => {
                if self.unindexed.insert(id.to_string()) {
                    self.bytes += ID_COST + id.len();
                }
                return;
            }
        };
        for (field, v) in fields {
            let k = key(v).expect("scalars only");
            self.bytes += insert(&mut self.eq, field, k, id);
            if let Some(x) = v.as_f64() {
                self.bytes += insert(&mut self.num, field, Ord64(x), id);
            }
        }
    }

    /// The most the fields can cost: every field and value new.
    fn most(id: &str, fields: &[(&String, &Value)]) -> usize {
        fields
            .iter()
            .map(|(f, v)| {
                let one = FIELD_COST + f.len() + VALUE_COST + key(v).as_ref().map_or(0, key_bytes) + ID_COST + id.len();
                if v.is_number() { 2 * one } else { one }
            })
            .sum()
    }

    pub fn remove(&mut self, id: &str, meta: Option<&Value>) {
        if self.unindexed.remove(id) {
            self.bytes -= ID_COST + id.len();
            shrink_set_if_sparse(&mut self.unindexed);
            return;
        }
        let Some(fields) = indexable(meta, &self.limits) else { return };
        for (field, v) in fields {
            let k = key(v).expect("scalars only");
            self.bytes -= take(&mut self.eq, field, &k, id);
            if let Some(x) = v.as_f64() {
                self.bytes -= take(&mut self.num, field, &Ord64(x), id);
            }
        }
        shrink_if_sparse(&mut self.eq);
        shrink_if_sparse(&mut self.num);
    }

    /// Ids that may match: those of the most selective condition, read from the index, and
    /// every unindexed candidate. The caller checks the other conditions on these few with
    /// `Filter::matches`.
    pub fn candidates<'a>(&'a self, f: &Filter) -> Vec<&'a str> {
        let mut best: Option<Vec<&'a str>> = None;
        for (field, cond) in &f.0 {
            let ids: Vec<&str> = match cond {
                Cond::In(keys) => match self.eq.get(field) {
                    Some(m) => keys.iter().filter_map(|k| m.get(k)).flatten().map(String::as_str).collect(),
                    None => Vec::new(),
                },
                Cond::Range { gte, lte } => match self.num.get(field) {
                    _ if gte.zip(*lte).is_some_and(|(g, l)| g > l) => Vec::new(),
                    Some(m) => {
                        let lo = std::ops::Bound::Included(Ord64(gte.unwrap_or(f64::NEG_INFINITY)));
                        let hi = std::ops::Bound::Included(Ord64(lte.unwrap_or(f64::INFINITY)));
                        m.range((lo, hi)).flat_map(|(_, s)| s).map(String::as_str).collect()
                    }
                    None => Vec::new(),
                },
            };
            if best.as_ref().is_none_or(|b| ids.len() < b.len()) {
                best = Some(ids);
            }
        }
        let mut ids = best.unwrap_or_default();
        ids.extend(self.unindexed.iter().map(String::as_str));
        // $in may list one value twice.
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Adds `id` under (field, value); returns the bytes that took.
fn insert<V, M: ValueMap<V>>(maps: &mut HashMap<String, M>, field: &str, v: V, id: &str) -> usize {
    let mut cost = 0;
    let m = match maps.get_mut(field) {
        Some(m) => m,
        None => {
            cost += FIELD_COST + field.len();
            maps.entry(field.to_string()).or_default()
        }
    };
    let vb = M::value_bytes(&v);
    let set = m.set(v, &mut cost, VALUE_COST + vb);
    if set.insert(id.to_string()) {
        cost += ID_COST + id.len();
    }
    cost
}

/// Removes `id` from (field, value), and the value and field when left empty; returns the
/// bytes that freed (what `insert` counted for them).
fn take<V, M: ValueMap<V>>(maps: &mut HashMap<String, M>, field: &str, v: &V, id: &str) -> usize {
    let Some(m) = maps.get_mut(field) else { return 0 };
    let mut freed = 0;
    if let Some(set) = m.get_set(v) {
        if set.remove(id) {
            freed += ID_COST + id.len();
        }
        if set.is_empty() {
            freed += VALUE_COST + M::value_bytes(v);
            m.drop_value(v);
        } else {
            shrink_set_if_sparse(set);
        }
    }
    if m.is_empty() {
        freed += FIELD_COST + field.len();
        maps.remove(field);
    }
    freed
}

/// Hash tables never shrink by themselves: after deletes they kept the size of their peak
/// (a delete of 1,020 candidates of 64 new fields each left ~16 MB of empty table behind).
/// Shrunk once three quarters are empty, so shrinking stays amortised O(1) per removal.
fn shrink_if_sparse<V>(m: &mut HashMap<String, V>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to_fit();
    }
}

fn shrink_set_if_sparse(s: &mut HashSet<String>) {
    if s.capacity() > 64 && s.len() * 4 < s.capacity() {
        s.shrink_to_fit();
    }
}

/// The two per-field maps (hashed values, ordered numbers), seen alike by `insert`/`take`.
trait ValueMap<V>: Default {
    fn set(&mut self, v: V, cost: &mut usize, new_cost: usize) -> &mut HashSet<String>;
    fn get_set(&mut self, v: &V) -> Option<&mut HashSet<String>>;
    fn drop_value(&mut self, v: &V);
    fn is_empty(&self) -> bool;
    fn value_bytes(v: &V) -> usize;
}

impl ValueMap<Key> for HashMap<Key, HashSet<String>> {
    fn set(&mut self, v: Key, cost: &mut usize, new_cost: usize) -> &mut HashSet<String> {
        self.entry(v).or_insert_with(|| {
            *cost += new_cost;
            HashSet::new()
        })
    }
    fn get_set(&mut self, v: &Key) -> Option<&mut HashSet<String>> {
        self.get_mut(v)
    }
    fn drop_value(&mut self, v: &Key) {
        self.remove(v);
    }
    fn is_empty(&self) -> bool {
        HashMap::is_empty(self)
    }
    fn value_bytes(v: &Key) -> usize {
        key_bytes(v)
    }
}

impl ValueMap<Ord64> for BTreeMap<Ord64, HashSet<String>> {
    fn set(&mut self, v: Ord64, cost: &mut usize, new_cost: usize) -> &mut HashSet<String> {
        self.entry(v).or_insert_with(|| {
            *cost += new_cost;
            HashSet::new()
        })
    }
    fn get_set(&mut self, v: &Ord64) -> Option<&mut HashSet<String>> {
        self.get_mut(v)
    }
    fn drop_value(&mut self, v: &Ord64) {
        self.remove(v);
    }
    fn is_empty(&self) -> bool {
        BTreeMap::is_empty(self)
    }
    fn value_bytes(_: &Ord64) -> usize {
        0
    }
}
