//! The candidate pool as text: read from plain-text (one candidate per line) and JSONL
//! (`{"id", "text", "meta"?}`) files. Ids must be unique across files.
pub mod cache;
pub mod filter;
pub mod live;
pub mod meta;
pub mod open;
pub mod store;


use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Default)]
pub struct Pool {
    pub ids: Vec<String>,
    pub texts: Vec<String>,
    pub meta: Vec<Option<serde_json::Value>>,
    /// Ids seen so far: ids must be unique across files.
    seen: HashSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlRow {
    id: serde_json::Value,
    text: String,
    #[serde(default)]
    meta: Option<serde_json::Value>,
}

impl Pool {
    pub fn load(files: &[impl AsRef<Path>]) -> Result<Pool> {
        let mut pool = Pool::default();
        for f in files {
            pool.read_file(f.as_ref())?;
        }
        if pool.is_empty() {
            bail!("the candidate files hold no candidates");
        }
        Ok(pool)
    }

    fn read_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading candidates {}", path.display()))?;
        let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            let (id, text, meta) = if jsonl {
                let row: JsonlRow = serde_json::from_str(line)
                    .with_context(|| format!("{}:{line_no}: expected {{\"id\", \"text\", \"meta\"?}}", path.display()))?;
                let id = match row.id {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => bail!("{}:{line_no}: id must be a string or a number", path.display()),
                };
                (id, row.text, row.meta)
            } else {
                (format!("{stem}-{line_no}"), line.trim().to_string(), None)
            };
            if text.trim().is_empty() {
                bail!("{}:{line_no}: empty candidate text", path.display());
            }
            if !self.seen.insert(id.clone()) {
                bail!("{}:{line_no}: duplicate candidate id `{id}`", path.display());
            }
            self.ids.push(id);
            self.texts.push(text);
            self.meta.push(meta);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
