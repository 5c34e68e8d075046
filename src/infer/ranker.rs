//! Text in, vectors and rankings out: the tokenizer and the model together, no threads.
//! Callers hold a no-grad guard (the inference thread sets one for its whole life).

use crate::model::scoring::ContextVectors;
use crate::model::format::{FormatError, PolySettings};
use std::sync::Arc;
use crate::model::PolyEncoder;
use crate::text::{to_batch, Tokenizer, TextKind};
use std::path::Path;
use tch::{Device, Tensor};
use tokenizers::Encoding;

pub struct Ranker {
    pub model: PolyEncoder,
    /// Shared with the handle, which tokenizes requests before they are queued.
    pub text: Arc<Tokenizer>,
}

impl Ranker {
    pub fn load(dir: &Path, device: Device) -> Result<Self, FormatError> {
        Self::load_in(dir, device, tch::Kind::Float)
    }

    /// With the encoders computing in `precision` (see `PolyEncoder::set_precision`).
    pub fn load_in(dir: &Path, device: Device, precision: tch::Kind) -> Result<Self, FormatError> {
        let settings = crate::model::format::PolySettings::load(dir)?;
        let text = Arc::new(Tokenizer::load(dir, &settings)?);
        Self::load_with(dir, settings, text, device, precision)
    }

    /// With the settings and tokenizer already loaded (the server loads them once, for the
    /// handle and this).
    pub fn load_with(dir: &Path, settings: PolySettings, text: Arc<Tokenizer>, device: Device, precision: tch::Kind) -> Result<Self, FormatError> {
        let mut model = PolyEncoder::load_with(dir, settings, device)?;
        if precision != tch::Kind::Float {
            model.set_precision(precision);
        }
        Ok(Ranker { model, text })
    }

    pub fn tokenize(&self, texts: &[String], kind: TextKind) -> Result<Vec<Encoding>, String> {
        self.text.tokenize(texts, kind)
    }

    /// `[N, d]` candidate vectors, in input order. Batches group texts of similar length so
    /// little compute goes to padding.
    pub fn candidate_vectors(&self, encodings: &[Encoding], batch_size: usize) -> Tensor {
        self.batched(encodings, batch_size, |b| self.model.candidate_vectors(b))
    }

    /// Context vectors (`[B, m, d]` and mask) for already tokenized contexts, in input order.
    pub fn context_codes(&self, encodings: &[Encoding], batch_size: usize) -> ContextVectors {
        let y = self.batched(encodings, batch_size, |b| {
            let c = self.model.context_codes(b);
            // Carry the mask through the same reordering by packing it as an extra column.
            let mask = c.mask.to_kind(c.y.kind()).unsqueeze(-1);
            Tensor::cat(&[c.y, mask], -1)
        });
        let d = self.model.dim();
        ContextVectors { y: y.narrow(-1, 0, d), mask: y.select(-1, d).to_kind(tch::Kind::Bool) }
    }

    fn batched(&self, encodings: &[Encoding], batch_size: usize, f: impl Fn(&crate::text::Batch) -> Tensor) -> Tensor {
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        let mut parts = Vec::new();
        for chunk in order.chunks(batch_size.max(1)) {
            let refs: Vec<&Encoding> = chunk.iter().map(|&i| &encodings[i]).collect();
            parts.push(f(&to_batch(&refs, self.model.device)));
        }
        let sorted = Tensor::cat(&parts, 0);
        // Undo the length sort: position order[k] received row k.
        let mut inverse = vec![0i64; order.len()];
        for (k, &i) in order.iter().enumerate() {
            inverse[i] = k as i64;
        }
        sorted.index_select(0, &Tensor::from_slice(&inverse).to_device(self.model.device))
    }

    /// Encodes one context and returns the best `k` rows of `candidates`, best first.
    pub fn rank(&self, context: &[String], candidates: &Tensor, k: i64) -> Result<Vec<(i64, f32)>, String> {
        let joined = self.text.join_turns(context);
        let enc = self.tokenize(&[joined], TextKind::Context)?;
        let codes = self.context_codes(&enc, 1);
        Ok(self.model.rank(&codes, candidates, &[k]).swap_remove(0))
    }
}
