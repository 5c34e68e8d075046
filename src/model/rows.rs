//! Candidate vectors as the scorer keeps them: an fp32 (or fp16) matrix, or a low-precision
//! copy the CPU multiplies natively plus what it takes to rebuild the exact vector.
//!
//! Low-precision rows are `[low, residual, scale, bound]`:
//! - int8: `q = round(c / s)` with one scale `s = max|c| / 127` per row, kept as
//!   `low = q + 128` (uint8, what the int8 GEMM reads), `residual = c / s − q` in fp16,
//!   `bound = Σ|q|` (the int8 error bound needs it);
//! - bf16: `low = bf16(c)`, `residual = c − low` in fp16; no scale (it would be 1) and no
//!   stored bound: the scorer takes `|low|₂` per slice as it goes (`lowp::approximate`),
//!   which keeps a bf16 row at fp32's size.
//!
//! The exact vector is rebuilt as `s · (low + residual)`: within `s · 2⁻¹²` (int8; about
//! `max|c| · 2⁻¹⁹`) or `|c| · 2⁻²⁰` (bf16) of the encoder's fp32 output, so a re-scored
//! candidate gets the fp32 score to about 1e-6 relative. Bytes per candidate at d = 384:
//! int8 1,160 (384 + 768 + 8), bf16 1,536 (768 + 768), fp32 1,536, fp16 768.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The precision the scoring GEMM runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Float32,
    Bfloat16,
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Bfloat16 => "bfloat16",
            Precision::Int8 => "int8",
        }
    }
}

/// `[n, d]` candidate vectors in one of the layouts above. Every part has the rows on dim 0,
/// so row operations (narrow, select, copy) treat all parts alike.
#[derive(Debug)]
pub struct CandidateRows {
    precision: Precision,
    /// Float32: `[matrix]`; low precision: `[low, residual, scale, bound]` (bf16's scale and
    /// bound are `[n, 0]`: zero bytes a row, and row operations still treat every part alike).
    parts: Vec<Tensor>,
}

const LOW: usize = 0;
const RESIDUAL: usize = 1;
const SCALE: usize = 2;
const BOUND: usize = 3;

/// The int8 layout of fp32 CPU rows in one pass per row (the tensor-op version made a dozen
/// whole-slice passes: 440 ms for a 100k pool at start, this ~60 ms).
fn int8_rows(v: &Tensor) -> Vec<Tensor> {
    let (n, d) = v.size2().expect("[n, d]");
    let v = v.contiguous();
    let data: Vec<f32> = Vec::try_from(v.view([-1])).unwrap_or_default();
    let (mut low, mut residual) = (vec![0u8; data.len()], vec![0f32; data.len()]);
    let (mut scale, mut bound) = (vec![1f32; n as usize], vec![0f32; n as usize]);
    for (r, row) in data.chunks(d as usize).enumerate() {
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        let mut l1 = 0f32;
        let base = r * d as usize;
        let inv = 1.0 / s;
        for (i, &x) in row.iter().enumerate() {
            let t = x * inv;
            // Round to nearest by the 1.5·2²³ trick (f32::round is a libm call per element).
            let q = ((t + 12_582_912.0) - 12_582_912.0).clamp(-127.0, 127.0);
            low[base + i] = (q + 128.0) as u8;
            residual[base + i] = t - q;
            l1 += q.abs();
        }
        scale[r] = s;
        bound[r] = l1;
    }
    vec![
        Tensor::from_slice(&low).view([n, d]),
        Tensor::from_slice(&residual).view([n, d]).to_kind(Kind::Half),
        Tensor::from_slice(&scale),
        Tensor::from_slice(&bound),
    ]
}

impl CandidateRows {
    /// A plain matrix (fp32 or fp16), scored in fp32.
    pub fn dense(matrix: Tensor) -> Self {
        CandidateRows { precision: Precision::Float32, parts: vec![matrix] }
    }

    /// `vectors` (fp32 `[k, d]`) in `precision`; `dense_kind` is the matrix's kind for
    /// Float32 (fp16 halves its memory).
    pub fn encode(vectors: &Tensor, precision: Precision, dense_kind: Kind) -> Self {
        // In slices: a dozen whole-matrix temporaries made converting a 100k pool at start
        // take about a second; slices of 16k rows stay in cache.
        const SLICE: i64 = 16_384;
        let n = vectors.size()[0];
        if precision == Precision::Float32 || n <= SLICE {
            return Self::encode_slice(vectors, precision, dense_kind);
        }
        let first = Self::encode_slice(&vectors.narrow(0, 0, SLICE), precision, dense_kind);
        let all = Self::zeros_like(&first, n);
        all.copy_in(0, &first);
        for start in (SLICE..n).step_by(SLICE as usize) {
            all.copy_in(start, &Self::encode_slice(&vectors.narrow(0, start, SLICE.min(n - start)), precision, dense_kind));
        }
        all
    }

    fn encode_slice(vectors: &Tensor, precision: Precision, dense_kind: Kind) -> Self {
        let v = vectors.to_kind(Kind::Float);
        let parts = match precision {
            Precision::Float32 => vec![v.to_kind(dense_kind)],
            // Quantized on the CPU (scoring in int8 runs only there; `precision::choose`).
            Precision::Int8 => int8_rows(&v.to_device(Device::Cpu)).into_iter().map(|p| p.to_device(v.device())).collect(),
            Precision::Bfloat16 => {
                let low = v.to_kind(Kind::BFloat16);
                let residual = (&v - low.to_kind(Kind::Float)).to_kind(Kind::Half);
                let none = Tensor::zeros([v.size()[0], 0], (Kind::Float, v.device()));
                vec![low, residual, none.shallow_clone(), none]
            }
        };
        CandidateRows { precision, parts }
    }

    /// `rows` zero rows of width `d` in the layout of `like`.
    pub fn zeros_like(like: &CandidateRows, rows: i64) -> Self {
        let parts = like
            .parts
            .iter()
            .map(|p| {
                let mut shape = p.size();
                shape[0] = rows;
                Tensor::zeros(shape.as_slice(), (p.kind(), p.device()))
            })
            .collect();
        CandidateRows { precision: like.precision, parts }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn len(&self) -> i64 {
        self.parts[0].size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> i64 {
        self.parts[0].size()[1]
    }

    pub fn device(&self) -> Device {
        self.parts[0].device()
    }

    /// Resident bytes per row.
    pub fn bytes_per_row(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.kind().elt_size_in_bytes() * p.size().iter().skip(1).product::<i64>() as usize)
            .sum()
    }

    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        CandidateRows { precision: self.precision, parts: self.parts.iter().map(f).collect() }
    }

    /// Rows `start..start + len` (views, no copy).
    pub fn narrow(&self, start: i64, len: i64) -> Self {
        self.map(|p| p.narrow(0, start, len))
    }

    /// The given rows, copied.
    pub fn select(&self, rows: &Tensor) -> Self {
        self.map(|p| p.index_select(0, rows))
    }

    /// Copies `src`'s rows over rows `start..start + src.len()` (same layout).
    pub fn copy_in(&self, start: i64, src: &CandidateRows) {
        for (dst, s) in self.parts.iter().zip(&src.parts) {
            dst.narrow(0, start, s.size()[0]).copy_(s);
        }
    }

    /// Copies row `from` over row `to`.
    pub fn copy_row(&self, from: i64, to: i64) {
        for p in &self.parts {
            let row = p.get(from);
            p.get(to).copy_(&row);
        }
    }

    pub fn to_device(&self, device: Device) -> Self {
        self.map(|p| p.to_device(device))
    }

    /// The vectors as fp32 `[n, d]`: the matrix itself, or rebuilt from the low copy.
    pub fn exact(&self) -> Tensor {
        match self.precision {
            Precision::Float32 => self.parts[0].to_kind(Kind::Float),
            Precision::Int8 | Precision::Bfloat16 => {
                let sum = self.parts[LOW].to_kind(Kind::Float) + self.parts[RESIDUAL].to_kind(Kind::Float);
                if self.precision == Precision::Int8 {
                    (sum - 128.0) * self.parts[SCALE].unsqueeze(1)
                } else {
                    sum
                }
            }
        }
    }

    /// The matrix scored in fp32 (Float32 layout only; fp16 storage is converted per slice).
    pub fn matrix(&self) -> Option<&Tensor> {
        (self.precision == Precision::Float32).then(|| &self.parts[0])
    }

    /// `(low, scale, bound)` of a low-precision layout (bf16: scale and bound `[n, 0]`).
    pub fn low(&self) -> Option<(&Tensor, &Tensor, &Tensor)> {
        (self.precision != Precision::Float32).then(|| (&self.parts[LOW], &self.parts[SCALE], &self.parts[BOUND]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn low_precision_rows_rebuild_the_fp32_vectors() {
        let v = Tensor::randn([300, 48], (Kind::Float, Device::Cpu)) * 3.0;
        let v = Tensor::cat(&[v, Tensor::zeros([1, 48], (Kind::Float, Device::Cpu))], 0);
        let int8 = CandidateRows::encode(&v, Precision::Int8, Kind::Float);
        let amax = v.abs().max().double_value(&[]);
        assert!(max_abs(&int8.exact(), &v) <= amax * 2f64.powi(-18), "int8 rebuild error {}", max_abs(&int8.exact(), &v));
        let bf16 = CandidateRows::encode(&v, Precision::Bfloat16, Kind::Float);
        assert!(max_abs(&bf16.exact(), &v) <= amax * 2f64.powi(-19), "bf16 rebuild error {}", max_abs(&bf16.exact(), &v));
        assert_eq!(int8.bytes_per_row(), 48 + 96 + 8);
        assert_eq!(bf16.bytes_per_row(), 96 + 96);
        assert_eq!(CandidateRows::encode(&v, Precision::Float32, Kind::Half).bytes_per_row(), 96);
    }

    #[test]
    fn row_operations_move_every_part() {
        let v = Tensor::randn([10, 8], (Kind::Float, Device::Cpu));
        let rows = CandidateRows::encode(&v, Precision::Int8, Kind::Float);
        let grown = CandidateRows::zeros_like(&rows, 16);
        grown.copy_in(0, &rows);
        grown.copy_row(9, 2);
        let idx = Tensor::from_slice(&[0i64, 2, 9]);
        let want = v.index_select(0, &Tensor::from_slice(&[0i64, 9, 9]));
        assert!(max_abs(&grown.select(&idx).exact(), &want) < 1e-4);
        assert_eq!(grown.narrow(0, 10).len(), 10);
    }
}
