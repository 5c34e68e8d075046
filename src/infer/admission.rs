//! Whether a request may reach the model: text limits, and its cost in tokens against the
//! per-request budget (`max_request_tokens`). Refusals are `InferError::Validation` (422).

use super::messages::InferError;
use crate::pool::meta::{violation, MetaLimits};
use crate::pool::filter::Filter;
use crate::pool::store::Candidate;

fn check_text(what: &str, t: &str, max_chars: usize) -> Result<(), InferError> {
    if t.trim().is_empty() {
        return Err(InferError::Validation(format!("{what} is empty")));
    }
    let n = t.chars().count();
    if n > max_chars {
        return Err(InferError::Validation(format!("{what} has {n} characters; the limit is {max_chars}")));
    }
    Ok(())
}

/// A context of at least one turn, each valid.
pub(super) fn check_turns(turns: &[String], max_chars: usize) -> Result<(), InferError> {
    if turns.is_empty() {
        return Err(InferError::Validation("context has no turns".into()));
    }
    for (i, t) in turns.iter().enumerate() {
        check_text(&format!("context turn {i}"), t, max_chars)?;
    }
    Ok(())
}

/// A list of 1..=max_items texts, each valid.
pub fn check_texts(what: &str, texts: &[String], max_items: usize, max_chars: usize) -> Result<(), InferError> {
    if texts.is_empty() || texts.len() > max_items {
        return Err(InferError::Validation(format!("{what} must hold between 1 and {max_items} texts, got {}", texts.len())));
    }
    for (i, t) in texts.iter().enumerate() {
        check_text(&format!("{what}[{i}]"), t, max_chars)?;
    }
    Ok(())
}

/// A cheap lower bound, before tokenizing, on the tokens a text costs once truncated to
/// `max`: every whitespace-separated word with an ASCII letter or digit yields at least one
/// token (no normaliser removes those; other scripts' letters or marks might be stripped);
/// 2 for [CLS] and [SEP].
pub(super) fn least_tokens(text: &str, max: usize) -> usize {
    let words = text.split_whitespace().filter(|w| w.bytes().any(|b| b.is_ascii_alphanumeric())).count();
    (words + 2).min(max)
}

/// The per-request budget: a request whose texts cost more is refused before it reaches the
/// model. `at_least` when `cost` is a lower bound.
pub(super) fn within_budget(budget: usize, cost: usize, at_least: bool) -> Result<(), InferError> {
    if cost <= budget {
        return Ok(());
    }
    Err(InferError::Validation(format!(
        "this request costs {}{cost} tokens (context and candidates after truncation); the per-request budget is {budget} (max_request_tokens): send fewer or shorter texts",
        if at_least { "at least " } else { "" }
    )))
}

pub(super) fn cost(enc: &[tokenizers::Encoding]) -> usize {
    enc.iter().map(|e| e.get_ids().len()).sum()
}

/// 1..=max ids, none twice (whether they are in the pool is for the inference thread to say:
/// the pool changes).
pub(super) fn check_ids(what: &str, ids: &[String], max: usize) -> Result<(), InferError> {
    if ids.is_empty() || ids.len() > max {
        return Err(InferError::Validation(format!("{what} must hold between 1 and {max} ids, got {}", ids.len())));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
        return Err(InferError::Validation(format!("id {dup:?} is given more than once")));
    }
    Ok(())
}

/// Longest accepted candidate id, in characters.
pub(super) const MAX_ID_CHARS: usize = 256;

/// Characters an id may not hold: control characters (Unicode Cc: NUL, newlines, escape, C1),
/// the line and paragraph separators, and the bidirectional formatting characters (LRM, RLM,
/// ALM, the embeddings, overrides and isolates), which make an id display as another one in
/// logs and consoles. openapi.yaml's `Candidate.id` pattern lists the same set.
fn forbidden_in_id(c: char) -> bool {
    c.is_control() || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A new candidate's id: 1 to `MAX_ID_CHARS` printable characters, not blank.
fn check_id(i: usize, id: &str) -> Result<(), InferError> {
    if id.trim().is_empty() || id.chars().count() > MAX_ID_CHARS {
        return Err(InferError::Validation(format!("candidates[{i}].id must be 1 to {MAX_ID_CHARS} characters, not blank")));
    }
    if let Some(c) = id.chars().find(|&c| forbidden_in_id(c)) {
        return Err(InferError::Validation(format!(
            "candidates[{i}].id holds U+{:04X}: ids may not hold control characters, line separators or bidirectional formatting characters",
            c as u32
        )));
    }
    Ok(())
}

/// A batch of candidates to upsert: ids valid and unique, texts valid, meta an object within
/// `limits`. One candidate over a limit refuses the whole batch: nothing is applied.
pub(super) fn check_candidates(cands: &[Candidate], max_items: usize, max_chars: usize, limits: &MetaLimits) -> Result<(), InferError> {
    if cands.is_empty() || cands.len() > max_items {
        return Err(InferError::Validation(format!("candidates must hold between 1 and {max_items} candidates, got {}", cands.len())));
    }
    let mut seen = std::collections::HashSet::with_capacity(cands.len());
    for (i, c) in cands.iter().enumerate() {
        check_id(i, &c.id)?;
        if !seen.insert(c.id.as_str()) {
            return Err(InferError::Validation(format!("id {:?} is given more than once", c.id)));
        }
        check_text(&format!("candidates[{i}].text"), &c.text, max_chars)?;
        match &c.meta {
            Some(m) if !m.is_object() => return Err(InferError::Validation(format!("candidates[{i}].meta must be an object"))),
            Some(m) => {
                if let Some(e) = violation(&format!("candidates[{i}].meta"), m, limits) {
                    return Err(InferError::Validation(e));
                }
            }
            None => {}
        }
    }
    Ok(())
}

/// What a rank request ranks against, from the fields that say it. The rules on which of
/// them go together are written here and only here (openapi.yaml describes them).
pub(super) enum Against {
    Inline(Vec<String>),
    Ids(Vec<String>, Option<Filter>),
    Approximate,
    Pool(Option<Filter>),
}

pub(super) fn against(candidates: Option<Vec<String>>, ids: Option<Vec<String>>, approximate: bool, filter: Option<&serde_json::Value>) -> Result<Against, InferError> {
    let invalid = |m: &str| Err(InferError::Validation(m.into()));
    if candidates.is_some() && ids.is_some() {
        return invalid("give either candidates or ids, not both");
    }
    if approximate && (candidates.is_some() || ids.is_some()) {
        return invalid("approximate ranks the pool; it cannot be combined with candidates or ids");
    }
    let filter = match filter {
        Some(_) if candidates.is_some() => return invalid("filter selects pool candidates by meta; it cannot be combined with inline candidates"),
        Some(_) if approximate => return invalid("filter cannot be combined with approximate"),
        Some(f) => Some(Filter::parse(f).map_err(InferError::Validation)?),
        None => None,
    };
    Ok(match (candidates, ids) {
        (Some(c), _) => Against::Inline(c),
        (None, Some(ids)) => Against::Ids(ids, filter),
        (None, None) if approximate => Against::Approximate,
        (None, None) => Against::Pool(filter),
    })
}
