//! ParlAI's dictionary and tokenizers, id for id: `DictionaryAgent.txt2vec` with
//! `--dict-tokenizer bpe` (subword-nmt codecs, as `SubwordBPEHelper` applies them),
//! `bytelevelbpe` (HF byte-level BPE from the dictionary's `-vocab.json` / `-merges.txt`, as
//! `HuggingFaceBpeHelper` runs it: the tokens it writes, looked up in ParlAI's dictionary) or `re`,
//! plus the start/end tokens and truncation `TorchAgent` adds around them. A model directory
//! written by `polyrank import parlai` holds the model's `.dict` and `.dict.codecs` files as
//! they were, and `parlai_tokenizer.json` with the options that shape tokenization.
//!
//! HF `tokenizers` cannot say this exactly (subword-nmt's merge loop, ParlAI's `\n` →
//! `__newln__` and Python's `\w`), so the few rules are written here and checked against
//! ParlAI itself on real text (tests/parlai_parity.rs).

use crate::model::format::{read_text, FormatError};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use tokenizers::{Encoding, Token};

pub const SETTINGS_FILE: &str = "parlai_tokenizer.json";
pub const DICT_FILE: &str = "parlai.dict";
pub const CODECS_FILE: &str = "parlai.dict.codecs";
/// Between the turns of a context, for a ParlAI model (`Tokenizer::join_turns`): ParlAI
/// tokenizes each turn alone and joins the ids with the delimiter's own ids, which byte-level
/// BPE does not give for the turns joined as one text. A text holding it splits there too.
pub const TURN_SEPARATOR: char = '\u{1e}';
/// `bytelevelbpe`'s files, as ParlAI saves them beside the dictionary (`F.dict-vocab.json`).
pub const VOCAB_FILE: &str = "parlai.dict-vocab.json";
pub const MERGES_FILE: &str = "parlai.dict-merges.txt";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// subword-nmt BPE over ParlAI's `\w+|[^\w\s]` pre-split (`--dict-tokenizer bpe`).
    Bpe,
    /// ParlAI's `re` tokenizer: `\w+|[^\w\s]|\n`, whole words looked up.
    Re,
    /// HF byte-level BPE (`--dict-tokenizer bytelevelbpe`).
    ByteLevelBpe,
}

/// The options of the model's `.opt` that decide its token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParlaiTextSettings {
    pub tokenizer: Split,
    pub lower: bool,
    pub null_token: String,
    pub start_token: String,
    pub end_token: String,
    pub unk_token: String,
    /// Context tokens kept (the latest) before the start and end tokens are added; None: all.
    pub text_truncate: Option<usize>,
    /// Candidate length kept, start and end tokens included (the end token is cut first).
    pub label_truncate: Option<usize>,
    /// `bytelevelbpe`: ParlAI's `--bpe-add-prefix-space` (its default: true).
    #[serde(default = "yes")]
    pub bpe_add_prefix_space: bool,
    /// ParlAI's `--history-size`: only the latest turns are kept; None: all.
    #[serde(default)]
    pub history_size: Option<usize>,
}

fn yes() -> bool {
    true
}

impl ParlaiTextSettings {
    pub fn load(dir: &Path) -> Result<Self, FormatError> {
        let path = dir.join(SETTINGS_FILE);
        serde_json::from_str(&read_text(&path)?).map_err(|e| FormatError::malformed(&path, e))
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join(SETTINGS_FILE), serde_json::to_string_pretty(self).expect("serialises") + "\n")
    }
}

/// subword-nmt's `apply_bpe.BPE`: merges by rank, the word's last symbol marked `</w>`.
struct Codecs {
    ranks: HashMap<(String, String), usize>,
    /// `#version: 0.2` marks the last character itself (`x</w>`); 0.1 appends `</w>` alone.
    version_02: bool,
    /// Words seen before (subword-nmt caches too); a word's pieces never change.
    cache: Mutex<HashMap<String, Vec<String>>>,
}

const END_OF_WORD: &str = "</w>";

impl Codecs {
    fn load(path: &Path) -> Result<Self, FormatError> {
        let text = read_text(path)?;
        let mut lines = text.trim_end_matches('\n').split('\n').peekable();
        let mut version_02 = false;
        if let Some(first) = lines.peek().filter(|l| l.starts_with("#version:")) {
            let v = first.split_whitespace().last().unwrap_or("");
            version_02 = v.trim_end_matches(".0") == "0.2";
            if !version_02 && v != "0.1" {
                return Err(FormatError::malformed(path, format!("codecs version `{v}` is not supported (0.1, 0.2)")));
            }
            lines.next();
        }
        let mut ranks = HashMap::new();
        for (rank, line) in lines.enumerate() {
            let parts: Vec<&str> = line.trim_matches(|c| c == '\r' || c == '\n' || c == ' ').split(' ').collect();
            let [a, b] = parts[..] else {
                return Err(FormatError::malformed(path, format!("line {}: not two symbols: `{line}`", rank + 2)));
            };
            // The first of duplicate merges wins, as in subword-nmt.
            ranks.entry((a.to_string(), b.to_string())).or_insert(rank);
        }
        Ok(Codecs { ranks, version_02, cache: Mutex::new(HashMap::new()) })
    }

    /// subword-nmt's `encode` for one word: its pieces, `</w>` removed.
    fn encode(&self, orig: &str) -> Vec<String> {
        if let Some(hit) = self.cache.lock().expect("cache").get(orig) {
            return hit.clone();
        }
        let chars: Vec<String> = orig.chars().map(String::from).collect();
        if chars.len() == 1 {
            return chars;
        }
        let mut word = chars;
        if self.version_02 {
            let last = word.pop().expect("two or more");
            word.push(last + END_OF_WORD);
        } else {
            word.push(END_OF_WORD.to_string());
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, (w[0].clone(), w[1].clone()))))
                .min_by_key(|(r, _)| *r);
            let Some((_, (a, b))) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        if word.last().map(String::as_str) == Some(END_OF_WORD) {
            word.pop();
        } else if let Some(last) = word.last_mut() {
            if let Some(stripped) = last.strip_suffix(END_OF_WORD) {
                *last = stripped.to_string();
            }
        }
        self.cache.lock().expect("cache").insert(orig.to_string(), word.clone());
        word
    }
}

/// `HuggingFaceBpeHelper`'s tokenizer: `ByteLevelBPETokenizer(vocab, merges, add_prefix_space)`
/// with ParlAI's four special tokens added (HF splits them out of a text before the BPE).
fn byte_level(dir: &Path, s: &ParlaiTextSettings) -> Result<tokenizers::Tokenizer, FormatError> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let (vocab, merges) = (dir.join(VOCAB_FILE), dir.join(MERGES_FILE));
    crate::model::format::require_file(&vocab)?;
    crate::model::format::require_file(&merges)?;
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| FormatError::malformed(&vocab, format!("not a byte-level BPE vocabulary with {MERGES_FILE}: {e}")))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(s.bpe_add_prefix_space, true, true)));
    let specials: Vec<tokenizers::AddedToken> = [&s.null_token, &s.start_token, &s.end_token, &s.unk_token]
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(|t| tokenizers::AddedToken::from(t.clone(), true))
        .collect();
    t.add_special_tokens(&specials);
    Ok(t)
}

/// A ParlAI dictionary and its tokenizer.
pub struct ParlaiText {
    pub settings: ParlaiTextSettings,
    tok2ind: HashMap<String, u32>,
    codecs: Option<Codecs>,
    byte_level: Option<tokenizers::Tokenizer>,
    splitter: Regex,
    unk: u32,
    pub start: u32,
    pub end: u32,
}

/// `DictionaryAgent.load`'s unescape.
fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
}

impl ParlaiText {
    pub fn load(dir: &Path) -> Result<Self, FormatError> {
        let settings = ParlaiTextSettings::load(dir)?;
        let dict_path = dir.join(DICT_FILE);
        crate::model::format::require_file(&dict_path)?;
        let bytes = std::fs::read(&dict_path).map_err(|e| FormatError::malformed(&dict_path, e))?;
        // Python reads it as text with errors='ignore' and universal newlines.
        let text = String::from_utf8_lossy(&bytes).replace('\u{FFFD}', "").replace("\r\n", "\n").replace('\r', "\n");
        let mut tok2ind: HashMap<String, u32> = HashMap::new();
        let mut add = |t: String| {
            let next = tok2ind.len() as u32;
            tok2ind.entry(t).or_insert(next);
        };
        let s = &settings;
        for special in [&s.null_token, &s.start_token, &s.end_token, &s.unk_token] {
            if !special.is_empty() {
                add(special.clone());
            }
        }
        let lower_special = s.null_token == s.null_token.to_lowercase();
        for line in text.split_terminator('\n') {
            let mut token = unescape(line.split('\t').next().unwrap_or(""));
            if lower_special && ["__UNK__", "__NULL__", "__END__", "__START__"].contains(&token.as_str()) {
                token = token.to_lowercase();
            }
            add(token);
        }
        let byte_level = match s.tokenizer {
            Split::ByteLevelBpe => Some(byte_level(dir, s)?),
            _ => None,
        };
        if let Some(t) = &byte_level {
            // `sync_with_dict`, which runs at every load: the BPE vocabulary's own tokens (its
            // ids 0.., the added specials left out) join the dictionary where missing.
            let base = t.get_vocab_size(false) as u32;
            for i in 0..base {
                if let Some(token) = t.id_to_token(i) {
                    add(token);
                }
            }
        }
        let id = |name: &str, t: &str| {
            tok2ind.get(t).copied().ok_or_else(|| FormatError::malformed(&dict_path, format!("the {name} token `{t}` is not in the dictionary")))
        };
        let (unk, start, end) = (id("unk", &s.unk_token)?, id("start", &s.start_token)?, id("end", &s.end_token)?);
        let codecs = match s.tokenizer {
            Split::Bpe => Some(Codecs::load(&dir.join(CODECS_FILE))?),
            Split::Re | Split::ByteLevelBpe => None,
        };
        // Python's `\w` is `_` or a letter or number (str.isalnum); its `\s` includes the
        // four ASCII separators \x1c-\x1f, which Unicode's White_Space (the regex crate's) lacks.
        let word = r"[\p{L}\p{N}_]";
        let pattern = match s.tokenizer {
            Split::Bpe => format!(r"{word}+|[^\p{{L}}\p{{N}}_\s\x1c-\x1f]"),
            Split::Re | Split::ByteLevelBpe => format!(r"{word}+|[^\p{{L}}\p{{N}}_\s\x1c-\x1f]|\n"),
        };
        let splitter = Regex::new(&pattern).expect("static pattern");
        Ok(ParlaiText { settings, tok2ind, codecs, byte_level, splitter, unk, start, end })
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.tok2ind.get(token).copied()
    }

    /// Tokens in the dictionary.
    pub fn len(&self) -> usize {
        self.tok2ind.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tok2ind.is_empty()
    }

    /// `DictionaryAgent.txt2vec`: ids and the token strings behind them.
    pub fn txt2vec(&self, text: &str) -> Vec<Token> {
        let text = if self.settings.lower { text.to_lowercase() } else { text.to_string() };
        if let Some(t) = &self.byte_level {
            // The tokens HF writes, each looked up in ParlAI's dictionary (`_word_lookup`).
            let Ok(enc) = t.encode(text.as_str(), false) else { return Vec::new() };
            return enc
                .get_tokens()
                .iter()
                .zip(enc.get_offsets())
                .map(|(piece, &offsets)| Token::new(self.tok2ind.get(piece).copied().unwrap_or(self.unk), piece.clone(), offsets))
                .collect();
        }
        let text = match self.codecs {
            Some(_) => text.replace('\n', " __newln__ "),
            None => text,
        };
        let mut out = Vec::new();
        for m in self.splitter.find_iter(&text) {
            let offsets = (m.start(), m.end());
            let mut push = |piece: String| {
                let id = self.tok2ind.get(&piece).copied().unwrap_or(self.unk);
                out.push(Token::new(id, piece, offsets));
            };
            match &self.codecs {
                Some(codecs) => {
                    let pieces = codecs.encode(m.as_str());
                    let n = pieces.len();
                    for (i, p) in pieces.into_iter().enumerate() {
                        push(if i + 1 < n { p + "@@" } else { p });
                    }
                }
                None => push(m.as_str().to_string()),
            }
        }
        out
    }

    fn special(&self, id: u32, text: &str) -> Token {
        Token::new(id, text.to_string(), (0, 0))
    }

    /// A one-turn context (see `context_turns`).
    pub fn context(&self, text: &str) -> Encoding {
        self.context_turns(&[text], "")
    }

    /// A context as ParlAI's `History` and `PolyencoderAgent` vectorize it: the latest
    /// `history_size` turns, each tokenized alone, joined by the delimiter's tokens; then the
    /// latest `text_truncate` tokens, and the start and end tokens around them.
    pub fn context_turns(&self, turns: &[&str], delimiter: &str) -> Encoding {
        let keep = self.settings.history_size.unwrap_or(turns.len()).min(turns.len());
        let between = self.txt2vec(delimiter);
        let mut body = Vec::new();
        for (i, turn) in turns[turns.len() - keep..].iter().enumerate() {
            if i > 0 {
                body.extend(between.iter().cloned());
            }
            body.extend(self.txt2vec(turn));
        }
        if let Some(t) = self.settings.text_truncate {
            if body.len() > t {
                body.drain(..body.len() - t);
            }
        }
        let mut tokens = Vec::with_capacity(body.len() + 2);
        tokens.push(self.special(self.start, &self.settings.start_token));
        tokens.extend(body);
        tokens.push(self.special(self.end, &self.settings.end_token));
        Encoding::from_tokens(tokens, 0)
    }

    /// A candidate as `vectorize_fixed_candidates` does it: start, text, end, then the first
    /// `label_truncate` of those.
    pub fn candidate(&self, text: &str) -> Encoding {
        let mut tokens = vec![self.special(self.start, &self.settings.start_token)];
        tokens.extend(self.txt2vec(text));
        tokens.push(self.special(self.end, &self.settings.end_token));
        if let Some(t) = self.settings.label_truncate {
            tokens.truncate(t);
        }
        Encoding::from_tokens(tokens, 0)
    }
}
