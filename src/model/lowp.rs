//! Ranking over low-precision rows with the fp32 answer.
//!
//! At 100k candidates and more a /rank is one `[N, d] × [d, m]` GEMM plus a softmax over
//! `[N, m]`. The GEMM runs in int8 (VNNI, `vpmaddubsw`) or bf16 here, and gives every
//! candidate an approximate score ŝ together with a proven bound ε, |s − ŝ| ≤ ε, where s is
//! the fp32 score:
//! 1. each logit is off by at most δ (the int8 rounding of both sides, or bf16's relative
//!    error), worked out per row from the row's scale and Σ|low|;
//! 2. s = Σᵢ softmaxᵢ(xᵢ/t) xᵢ moves by at most δ·(1 + range(x)/t) when every xᵢ moves by δ
//!    (∂s/∂xⱼ = wⱼ(1 + (xⱼ − s)/t), and Σ wⱼ|xⱼ − s| ≤ range);
//! 3. the fast exp and fp32 sums add a relative slack.
//!
//! Then the best `k·SHORTLIST` rows by ŝ are re-scored in fp32 from their rebuilt vectors;
//! their k-th exact score T is a floor under the true k-th best score, and every other row
//! with ŝ + ε ≥ T is re-scored too. No row left out can reach the top k, so the returned
//! top-k and its scores are the fp32 model's (to the rebuild's ~1e-6), whatever the data.
//! How many rows the guard adds is the price of a loose bound, never a wrong answer.

use super::attention::Attention;
use super::int8;
use super::rows::{CandidateRows, Precision};
use super::scoring::{self, ContextVectors};
use tch::{Kind, Tensor};

/// Rows re-scored first per requested result: the first pass's k-th exact score is the
/// floor the guard compares with, and a floor closer to the true k-th score lets fewer rows
/// through.
pub const SHORTLIST: i64 = 4;
/// The first pass re-scores at least this many rows.
const MIN_SHORTLIST: i64 = 64;
/// Below this many rows the low-precision pass costs more than it saves: rebuild and score
/// in fp32 (a filter or an id list that keeps few rows lands here).
pub const MIN_LOW_ROWS: i64 = 2048;
/// Rows per GEMM slice: the `[rows, B·m]` int32 logits stay in cache through the fused pass.
const SLICE_LOGITS: i64 = 262_144;

/// What one low-precision ranking did, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Effort {
    /// Rows scored in fp32 after the low-precision pass (first pass + guard).
    pub rescored: usize,
}

/// The best `ks[b]` rows for each context `b`, exact, and the rows re-scored in fp32.
pub fn rank(codes: &ContextVectors, rows: &CandidateRows, attn: &Attention, ks: &[i64]) -> (Vec<Vec<(i64, f32)>>, Effort) {
    let n = rows.len();
    let plain = |m: &Tensor| {
        let scores = scoring::score(codes, m, attn);
        ks.iter().enumerate().map(|(b, &k)| scoring::top_k(&scores.get(b as i64), k)).collect()
    };
    if let Some(m) = rows.matrix() {
        return (plain(m), Effort::default());
    }
    // The bound holds for the dot-product attentions; a multihead head (its own projections)
    // and small sets are scored from the rebuilt vectors.
    let t = match attn {
        Attention::Basic => 1.0,
        Attention::Sqrt => (rows.dim() as f32).sqrt(),
        Attention::Multihead(_) => return (plain(&rows.exact()), Effort { rescored: n as usize }),
    };
    if n < MIN_LOW_ROWS || rows.device() != tch::Device::Cpu {
        return (plain(&rows.exact()), Effort { rescored: n as usize });
    }
    let approx = match approximate(codes, rows, t, ks) {
        Ok(a) => a,
        // Startup checked the int8 GEMM; should it fail later, the answer is still exact.
        Err(e) => {
            tracing::warn!("low-precision scoring failed, scoring in fp32: {e}");
            return (plain(&rows.exact()), Effort { rescored: n as usize });
        }
    };
    let mut effort = Effort::default();
    let ranked = ks
        .iter()
        .enumerate()
        .map(|(b, &k)| {
            let (hits, rescored) = exact_top_k(&codes.select(b as i64), rows, attn, &approx[b], k);
            effort.rescored += rescored;
            hits
        })
        .collect();
    (ranked, effort)
}

/// One context's approximate scores and their bounds, one entry per row.
pub struct Approx {
    pub score: Vec<f32>,
    pub bound: Vec<f32>,
}

/// The context side of the low-precision GEMM, and for each context the scale and the error
/// terms the bound needs.
struct Keys {
    /// int8: the packed `[B·m, d]` 7-bit codes; bf16: `[d, B·m]`.
    keys: KeyMatrix,
    /// int8: each context's scale (one for its m codes); bf16: 1.
    scale: Vec<f32>,
    /// int8: max over codes of Σ|low|; bf16: max over codes of |y|₂.
    bound: Vec<f32>,
    /// Per context, the codes softmax runs over (n_first pads short contexts with masked codes).
    active: Vec<Vec<usize>>,
}

enum KeyMatrix {
    Int8(int8::Packed),
    Bf16(Tensor),
}

fn keys(codes: &ContextVectors, precision: Precision) -> Result<Keys, String> {
    let (b, m, d) = codes.y.size3().expect("[B, m, d]");
    let mask = codes.mask.to_kind(Kind::Float).unsqueeze(-1);
    // Masked codes are zeroed: they take no part in the softmax (`active`) and add nothing.
    let y = codes.y.to_kind(Kind::Float) * &mask;
    let mask_rows: Vec<bool> = Vec::try_from(codes.mask.to_kind(Kind::Bool).reshape([-1])).unwrap_or_default();
    let active = (0..b as usize).map(|i| (0..m as usize).filter(|&j| mask_rows[i * m as usize + j]).collect()).collect();
    match precision {
        Precision::Int8 => {
            // 7 bits on this side (see `int8`).
            let amax = y.abs().amax([1, 2], false); // [B]
            let scale = amax.where_scalarother(&amax.gt(0.0), 63.0) / 63.0;
            let low = (&y / scale.view([b, 1, 1])).round().clamp(-63.0, 63.0);
            let bound = low.abs().sum_dim_intlist(2, false, Kind::Float).amax([1], false);
            Ok(Keys {
                keys: KeyMatrix::Int8(int8::prepack(&low.reshape([b * m, d]))?),
                scale: Vec::try_from(scale).unwrap_or_default(),
                bound: Vec::try_from(bound).unwrap_or_default(),
                active,
            })
        }
        Precision::Bfloat16 | Precision::Float32 => {
            let norm = y.norm_scalaropt_dim(2.0, [2], false).amax([1], false);
            Ok(Keys {
                keys: KeyMatrix::Bf16(y.to_kind(Kind::BFloat16).reshape([b * m, d]).transpose(0, 1).contiguous()),
                scale: vec![1.0; b as usize],
                bound: Vec::try_from(norm).unwrap_or_default(),
                active,
            })
        }
    }
}

/// ŝ and ε for every row and context, a slice of rows at a time: the low-precision GEMM,
/// then one pass per row over its m logits (dequantize, softmax, weighted sum, bound).
pub fn approximate(codes: &ContextVectors, rows: &CandidateRows, t: f32, ks: &[i64]) -> Result<Vec<Approx>, String> {
    let (low, row_scale, row_bound) = rows.low().expect("low-precision rows");
    let (b, m, d) = codes.y.size3().expect("[B, m, d]");
    let k = keys(codes, rows.precision())?;
    let n = rows.len();
    let mut out: Vec<Approx> = (0..b).map(|_| Approx { score: vec![0.0; n as usize], bound: vec![0.0; n as usize] }).collect();
    let slice = (SLICE_LOGITS / (b * m)).max(256);
    let (row_scale, row_bound) = (row_scale.contiguous(), row_bound.contiguous());
    let (row_scale, row_bound) = (host_f32(&row_scale), host_f32(&row_bound));
    let mut floors: Vec<Floor> = ks.iter().map(|&k| Floor::new(k.max(0) as usize)).collect();
    for start in (0..n).step_by(slice as usize) {
        let len = slice.min(n - start);
        let part = low.narrow(0, start, len);
        let range = start as usize..(start + len) as usize;
        match &k.keys {
            KeyMatrix::Int8(packed) => {
                let logits = int8::matmul(&part, packed)?.contiguous(); // [len, B·m], exact integer sums
                let logits = host_f32(&logits);
                for ctx in 0..b as usize {
                    let rows = Block { logits: &logits, stride: (b * m) as usize, first: ctx * m as usize, active: &k.active[ctx] };
                    let (ys, yb) = (k.scale[ctx], k.bound[ctx]);
                    let half_d = d as f32 / 2.0;
                    let o = &mut out[ctx];
                    rows.fold(
                        |j| row_scale[range.start + j] * ys,
                        // |c·y − s_c s_y ĉ·ŷ| ≤ s_c s_y (Σ|ĉ| + Σ|ŷ| + d/2) / 2, ĉ, ŷ the codes.
                        |j| row_scale[range.start + j] * ys * (row_bound[range.start + j] + yb + half_d) / 2.0,
                        t,
                        &mut floors[ctx],
                        &mut o.score[range.clone()],
                        &mut o.bound[range.clone()],
                    );
                }
            }
            KeyMatrix::Bf16(keys) => {
                // bf16 products summed in fp32, the result rounded to bf16 (u = 2⁻⁸ each time):
                // |c·y − x̂| ≤ |c||y| (3u + 4u² + d·2⁻²⁴), with margin.
                let rel = 3.0 * 2f32.powi(-8) + 4.0 * 2f32.powi(-16) + d as f32 * 2f32.powi(-24);
                let logits = part.matmul(keys).to_kind(Kind::Float).contiguous();
                let logits = host_f32(&logits);
                // |c| from the bf16 row itself (c = low + r, |r| ≤ 2⁻⁸|c|, so |c| ≤ |low| /
                // (1 − 2⁻⁸) < 1.004 |low|): a pass of d per row beside the GEMM's 2·m·d, and
                // no stored bound, so a bf16 row costs what an fp32 one does.
                let norms = (part.to_kind(Kind::Float).norm_scalaropt_dim(2.0, [1], false) * 1.004).contiguous();
                let norms = host_f32(&norms);
                for ctx in 0..b as usize {
                    let rows = Block { logits: &logits, stride: (b * m) as usize, first: ctx * m as usize, active: &k.active[ctx] };
                    let yb = k.bound[ctx];
                    let o = &mut out[ctx];
                    rows.fold(
                        |_| 1.0,
                        |j| norms[j] * yb * rel * 1.01,
                        t,
                        &mut floors[ctx],
                        &mut o.score[range.clone()],
                        &mut o.bound[range.clone()],
                    );
                }
            }
        }
    }
    Ok(out)
}

/// A contiguous fp32 CPU tensor's data, borrowed (copying 1 MB per slice cost ~5 ms at 100k).
fn host_f32(t: &Tensor) -> &[f32] {
    assert!(t.kind() == Kind::Float && t.is_contiguous() && t.device() == tch::Device::Cpu);
    if t.numel() == 0 {
        return &[]; // an empty tensor's data_ptr may be null, which a slice must never be
    }
    // SAFETY: a contiguous fp32 CPU tensor holds numel() f32s at data_ptr(); the slice
    // borrows `t`, which keeps the storage alive and is not written while it is borrowed.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) }
}

/// One context's logits in a slice: row j's are `logits[j·stride + first + i]`, i in `active`.
#[derive(Clone, Copy)]
struct Block<'a> {
    logits: &'a [f32],
    stride: usize,
    first: usize,
    active: &'a [usize],
}

impl Block<'_> {
    /// One pass over the slice's rows (one thread: splitting the rows over a second one made
    /// it slower here, libtorch's OpenMP workers spin for a while after the GEMM). For each
    /// row: x = logit · scale(j); ŝ = Σ softmax(x/t) x; ε = δ(j)·(1 + (range + 2δ)/t) plus the
    /// slack of the fast exp (relative 2e-7 → weights off by 1e-6) and the fp32 sums.
    /// s ≤ max x (a softmax-weighted mean) ≤ max x̂ + δ: a row whose max logit is under the
    /// floor minus δ cannot reach the top k, and skips its softmax (ŝ = −∞).
    fn fold(&self, scale: impl Fn(usize) -> f32, delta: impl Fn(usize) -> f32, t: f32, floor: &mut Floor, score: &mut [f32], bound: &mut [f32]) {
        let m = self.active.len();
        let contiguous = self.active.iter().enumerate().all(|(i, &a)| a == i);
        #[cfg(target_arch = "x86_64")]
        let avx2 = contiguous && m % 8 == 0 && m > 0 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let mut x = vec![0f32; m];
        let inv_t = 1.0 / t;
        for j in 0..score.len() {
            let row = &self.logits[j * self.stride + self.first..];
            let (s, dl) = (scale(j), delta(j));
            let cutoff = floor.value() - dl;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA (checked above); `row` holds at least m = 8·k floats.
            let found = if avx2 { unsafe { avx2::softmax_mean(&row[..m], s, inv_t, cutoff) } } else { portable(&mut x, row, self.active, contiguous, s, inv_t, cutoff) };
            #[cfg(not(target_arch = "x86_64"))]
            let found = portable(&mut x, row, self.active, contiguous, s, inv_t, cutoff);
            match found {
                Some((sh, range, top)) => {
                    score[j] = sh;
                    bound[j] = bound_of(dl, range, top, inv_t);
                    floor.offer(sh - bound[j]);
                }
                None => {
                    score[j] = f32::NEG_INFINITY;
                    bound[j] = 0.0;
                }
            }
        }
    }
}

/// The row pass without SIMD intrinsics: x = the active logits · scale, then `softmax_mean`;
/// None when max x < `cutoff`.
fn portable(x: &mut [f32], row: &[f32], active: &[usize], contiguous: bool, scale: f32, inv_t: f32, cutoff: f32) -> Option<(f32, f32, f32)> {
    let m = x.len();
    if contiguous {
        for (xi, &l) in x.iter_mut().zip(&row[..m]) {
            *xi = l * scale;
        }
    } else {
        for (xi, &a) in x.iter_mut().zip(active) {
            *xi = row[a] * scale;
        }
    }
    if x.iter().all(|&v| v < cutoff) {
        return None;
    }
    Some(softmax_mean(x, inv_t))
}

/// The k-th best lower bound (ŝ − ε) seen so far: no row's true score under it can be in
/// the top k, since k rows score at least that much.
struct Floor {
    k: usize,
    best: std::collections::BinaryHeap<std::cmp::Reverse<Key>>,
}

#[derive(PartialEq)]
struct Key(f32);
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

impl Floor {
    fn new(k: usize) -> Self {
        Floor { k, best: std::collections::BinaryHeap::with_capacity(k + 1) }
    }

    fn value(&self) -> f32 {
        match self.best.peek() {
            Some(std::cmp::Reverse(Key(v))) if self.best.len() >= self.k && self.k > 0 => *v,
            _ => f32::NEG_INFINITY,
        }
    }

    fn offer(&mut self, lower: f32) {
        if self.k == 0 || !lower.is_finite() {
            return;
        }
        if self.best.len() < self.k {
            self.best.push(std::cmp::Reverse(Key(lower)));
        } else if lower > self.value() {
            self.best.pop();
            self.best.push(std::cmp::Reverse(Key(lower)));
        }
    }
}

/// ε from the logit error δ, the row's logit range and max |x| (see the module doc).
#[inline(always)]
fn bound_of(delta: f32, range: f32, top: f32, inv_t: f32) -> f32 {
    delta * (1.0 + (range + 2.0 * delta) * inv_t) + 1e-5 * (range + top) + f32::MIN_POSITIVE
}

/// The row pass in AVX2 + FMA intrinsics for m a multiple of 8 (every codes model; n_first
/// contexts of other lengths take the portable path). The portable loop, even compiled for
/// AVX2, took 29–53 ms at 100k rows × 64 codes: about as long as the int8 GEMM.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `softmax_mean` of `row · scale`: (Σ softmax(x/t)·x, range of x, max |x|).
    #[target_feature(enable = "avx2,fma")]
    /// None, without the exponentials, when max x < `cutoff`.
    pub unsafe fn softmax_mean(row: &[f32], scale: f32, inv_t: f32, cutoff: f32) -> Option<(f32, f32, f32)> {
        let n = row.len() / 8;
        let s = _mm256_set1_ps(scale);
        let (mut hi, mut lo) = (_mm256_set1_ps(f32::NEG_INFINITY), _mm256_set1_ps(f32::INFINITY));
        let mut x = [_mm256_setzero_ps(); 16];
        let x = &mut x[..n.min(16)];
        if n > 16 {
            return Some(super::softmax_mean(&row.iter().map(|v| v * scale).collect::<Vec<_>>(), inv_t));
        }
        for (i, xi) in x.iter_mut().enumerate() {
            *xi = _mm256_mul_ps(_mm256_loadu_ps(row.as_ptr().add(i * 8)), s);
            hi = _mm256_max_ps(hi, *xi);
            lo = _mm256_min_ps(lo, *xi);
        }
        let (h, l) = (hmax(hi), -hmax(_mm256_sub_ps(_mm256_setzero_ps(), lo)));
        if h < cutoff {
            return None;
        }
        let (hv, it) = (_mm256_set1_ps(h), _mm256_set1_ps(inv_t));
        let (mut sum, mut weighted) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for xi in x.iter() {
            let e = exp(_mm256_mul_ps(_mm256_sub_ps(*xi, hv), it));
            sum = _mm256_add_ps(sum, e);
            weighted = _mm256_fmadd_ps(e, *xi, weighted);
        }
        Some((hsum(weighted) / hsum(sum), h - l, h.abs().max(l.abs())))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: __m256) -> f32 {
        let q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_max_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_max_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    /// `super::fast_exp` on 8 lanes (z ≤ 0).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(z: __m256) -> __m256 {
        use super::{LN2_HI, LN2_LO, LOG2E, MAGIC};
        let z = _mm256_max_ps(z, _mm256_set1_ps(-87.0));
        let k = _mm256_fmadd_ps(z, _mm256_set1_ps(LOG2E), _mm256_set1_ps(MAGIC));
        let n = _mm256_sub_ps(k, _mm256_set1_ps(MAGIC));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), z);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_sub_epi32(_mm256_castps_si256(k), _mm256_set1_epi32(MAGIC.to_bits() as i32));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(127)), 23));
        _mm256_mul_ps(p, two_n)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_avx2_pass_matches_the_portable_one() {
            if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
                return; // nothing to compare on this CPU: the portable pass runs
            }
            for (m, spread) in [(8usize, 0.5f32), (64, 3.0), (64, 40.0), (128, 0.01)] {
                let row: Vec<f32> = (0..m).map(|i| (((i * 7919) % 101) as f32 / 50.0 - 1.0) * spread).collect();
                for inv_t in [1.0f32, 0.05] {
                    let (a, ra, ta) = unsafe { super::softmax_mean(&row, 0.7, inv_t, f32::NEG_INFINITY) }.unwrap();
                    assert!(unsafe { super::softmax_mean(&row, 0.7, inv_t, f32::INFINITY) }.is_none());
                    let scaled: Vec<f32> = row.iter().map(|v| v * 0.7).collect();
                    let (b, rb, tb) = super::super::softmax_mean(&scaled, inv_t);
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "m {m}: {a} vs {b}");
                    assert!((ra - rb).abs() <= 1e-6 * (1.0 + rb) && (ta - tb).abs() <= 1e-6 * (1.0 + tb));
                }
            }
        }
    }
}

/// Σ softmax(x/t)·x over `x`, with the range of x and max |x|. Eight lanes of partial
/// maxima and sums, so the compiler vectorizes it (a plain running sum is a serial chain:
/// the first version spent ~0.4 µs a row there, more than the int8 GEMM itself).
#[inline(always)]
fn softmax_mean(x: &[f32], inv_t: f32) -> (f32, f32, f32) {
    const L: usize = 8;
    if x.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let (mut hi, mut lo) = ([f32::NEG_INFINITY; L], [f32::INFINITY; L]);
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks.clone() {
        for i in 0..L {
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
        }
    }
    let (mut h, mut l) = (f32::NEG_INFINITY, f32::INFINITY);
    for i in 0..L {
        h = h.max(hi[i]);
        l = l.min(lo[i]);
    }
    for &v in rest {
        h = h.max(v);
        l = l.min(v);
    }
    let (mut sum, mut weighted) = ([0f32; L], [0f32; L]);
    for c in chunks {
        for i in 0..L {
            let e = fast_exp((c[i] - h) * inv_t);
            sum[i] += e;
            weighted[i] += e * c[i];
        }
    }
    let (mut s, mut w) = (sum.iter().sum::<f32>(), weighted.iter().sum::<f32>());
    for &v in rest {
        let e = fast_exp((v - h) * inv_t);
        s += e;
        w += e * v;
    }
    (w / s, h - l, h.abs().max(l.abs()))
}

// The constants of `fast_exp` and `avx2::exp`.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2²³: adding it rounds to an integer in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// e^z for z ≤ 0, relative error below 2e-7 (Cody–Waite reduction to [−ln2/2, ln2/2], a
/// degree-6 Taylor polynomial); plain arithmetic, so the loop around it vectorizes.
#[inline(always)]
fn fast_exp(z: f32) -> f32 {
    let z = if z > -87.0 { z } else { -87.0 };
    let k = z * LOG2E + MAGIC;
    let n = k - MAGIC; // round(z·log2e), as a float
    let r = (z - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ from k's bits (n sits in its low mantissa bits): integer adds and a shift, no
    // float-to-int conversion (Rust's saturating `as` kept the loop from vectorizing well).
    let two_n = f32::from_bits(k.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

/// The fp32 top-k of one context from its approximate scores: the first shortlist, then the
/// guard; returns the hits and how many rows were re-scored.
fn exact_top_k(codes: &ContextVectors, rows: &CandidateRows, attn: &Attention, approx: &Approx, k: i64) -> (Vec<(i64, f32)>, usize) {
    let n = rows.len();
    let k = k.min(n);
    if k <= 0 {
        return (Vec::new(), 0);
    }
    // Rows the pass skipped (score −∞) are proven out of the top k: only the others compete.
    let mut order: Vec<u32> = (0..n as u32).filter(|&r| approx.score[r as usize] > f32::NEG_INFINITY).collect();
    if (order.len() as i64) < k {
        order = (0..n as u32).collect();
    }
    let first = ((k * SHORTLIST).max(MIN_SHORTLIST) as usize).min(order.len());
    let by_score = |a: &u32, b: &u32| approx.score[*b as usize].total_cmp(&approx.score[*a as usize]);
    if first < order.len() {
        order.select_nth_unstable_by(first - 1, by_score);
    }
    let mut scored = rescore(codes, rows, attn, &order[..first]);
    let mut exact: Vec<f32> = scored.iter().map(|h| h.1).collect();
    exact.select_nth_unstable_by((k - 1) as usize, |a, b| b.total_cmp(a));
    let floor = exact[(k - 1) as usize];
    // The exact scores carry fp32 rounding too: keep rows that tie within it.
    let floor = floor - 1e-5 * floor.abs() - f32::MIN_POSITIVE;
    let guard: Vec<u32> = order[first..]
        .iter()
        .copied()
        .filter(|&r| approx.score[r as usize] + approx.bound[r as usize] >= floor)
        .collect();
    if !guard.is_empty() {
        scored.extend(rescore(codes, rows, attn, &guard));
    }
    let rescored = scored.len();
    scored.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k as usize);
    (scored, rescored)
}

/// fp32 scores of the given rows, from their rebuilt vectors.
fn rescore(codes: &ContextVectors, rows: &CandidateRows, attn: &Attention, which: &[u32]) -> Vec<(i64, f32)> {
    let ids: Vec<i64> = which.iter().map(|&r| r as i64).collect();
    let mut out = Vec::with_capacity(ids.len());
    // Slices bound the rebuilt copy when the guard lets many rows through.
    for part in ids.chunks(16_384) {
        let idx = Tensor::from_slice(part).to_device(rows.device());
        let exact = rows.select(&idx).exact();
        let scores: Vec<f32> = Vec::try_from(scoring::score(codes, &exact, attn).get(0).to_kind(Kind::Float)).unwrap_or_default();
        out.extend(part.iter().copied().zip(scores));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    /// Random pools and contexts at several scales (flat and peaked softmax), every
    /// attention kind and masked codes: the low-precision answer is the fp32 one.
    #[test]
    fn low_precision_rankings_are_the_fp32_rankings() {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let d = 32;
        let spec = |kind, heads| super::super::format::AttentionSpec { kind, heads };
        use super::super::format::AttentionKind as K;
        let attns = [
            Attention::new(vs.root() / "b", spec(K::Basic, 1), d),
            Attention::new(vs.root() / "s", spec(K::Sqrt, 1), d),
            Attention::new(vs.root() / "m", spec(K::Multihead, 4), d),
        ];
        for (case, (n, m, scale)) in [(5000i64, 8i64, 0.3f64), (3000, 16, 3.0), (4096, 1, 1.0), (2500, 4, 10.0)].into_iter().enumerate() {
            let pool = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
            let y = Tensor::randn([3, m, d], (Kind::Float, Device::Cpu)) * scale;
            // Context 1 has its last codes masked (n_first on a short context).
            let mask = Tensor::ones([3, m], (Kind::Bool, Device::Cpu));
            if m > 2 {
                let _ = mask.get(1).narrow(0, m / 2, m - m / 2).fill_(0);
            }
            let y = &y * mask.to_kind(Kind::Float).unsqueeze(-1);
            let codes = ContextVectors { y, mask };
            for attn in &attns {
                let full = scoring::score(&codes, &pool, attn);
                let want: Vec<Vec<(i64, f32)>> = [10i64, 1, 50].iter().enumerate().map(|(b, &k)| scoring::top_k(&full.get(b as i64), k)).collect();
                for p in [Precision::Int8, Precision::Bfloat16] {
                    let rows = CandidateRows::encode(&pool, p, Kind::Float);
                    let (got, effort) = rank(&codes, &rows, attn, &[10, 1, 50]);
                    for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.len(), w.len());
                        // Position by position the same scores, and each returned row carries
                        // its own fp32 score: the same top-k up to rows that tie within 1e-5.
                        for (a, e) in g.iter().zip(w) {
                            let tol = 1e-5 * e.1.abs().max(1.0);
                            let own = full.double_value(&[b as i64, a.0]) as f32;
                            assert!((a.1 - e.1).abs() <= tol && (a.1 - own).abs() <= tol, "case {case} {p:?} {attn:?}: {a:?} vs {e:?} (own {own})");
                        }
                    }
                    assert!(effort.rescored >= 10 + 1 + 50);
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_close_to_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let z = -(i as f32) * 80.0 / 200_000.0;
            let (a, b) = (fast_exp(z) as f64, (z as f64).exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(fast_exp(-1000.0) < 1e-37, true);
    }

    #[test]
    fn softmax_mean_matches_the_definition() {
        let x0: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 32.0) / 7.0).collect();
        for t in [1.0f32, 19.6] {
            let x = x0.clone();
            let (s, range, top) = softmax_mean(&x, 1.0 / t);
            let w: Vec<f64> = x0.iter().map(|&v| ((v - x0.iter().cloned().fold(f32::MIN, f32::max)) as f64 / t as f64).exp()).collect();
            let want = w.iter().zip(&x0).map(|(w, &v)| w * v as f64).sum::<f64>() / w.iter().sum::<f64>();
            assert!((s as f64 - want).abs() < 1e-5, "{s} vs {want}");
            assert!((range - 63.0 / 7.0).abs() < 1e-5 && (top - 32.0 / 7.0).abs() < 1e-5);
        }
    }
}
