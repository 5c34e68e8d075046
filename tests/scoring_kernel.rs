//! The batched scoring kernel against the Poly-encoder formula written out per candidate
//! (plain f64 loops over vectors), for every attention type and m ∈ {1, 16, 64}.

use polyrank::model::attention::Attention;
use polyrank::model::scoring::{score, top_k, ContextVectors};
use polyrank::model::format::{AttentionKind, AttentionSpec};
use tch::{nn, Device, Kind, Tensor};

type Mat = Vec<Vec<f64>>;

fn to_mat(t: &Tensor) -> Mat {
    let t = t.to_kind(Kind::Double).contiguous();
    let (r, c) = t.size2().unwrap();
    let flat: Vec<f64> = Vec::try_from(t.view([-1])).unwrap();
    (0..r as usize).map(|i| flat[i * c as usize..(i + 1) * c as usize].to_vec()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// softmax over the unmasked entries; masked entries get weight 0.
fn softmax(logits: &[f64], keep: &[bool]) -> Vec<f64> {
    let max = logits.iter().zip(keep).filter(|(_, k)| **k).map(|(l, _)| *l).fold(f64::MIN, f64::max);
    let e: Vec<f64> = logits.iter().zip(keep).map(|(l, k)| if *k { (l - max).exp() } else { 0.0 }).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn linear(w: &Mat, b: &[f64], x: &[f64]) -> Vec<f64> {
    w.iter().zip(b).map(|(row, bias)| dot(row, x) + bias).collect()
}

fn naive_scores(attn: &Attention, y: &Mat, keep: &[bool], cands: &Mat) -> Vec<f64> {
    let d = y[0].len();
    cands
        .iter()
        .map(|c| {
            let attended: Vec<f64> = match attn {
                Attention::Basic | Attention::Sqrt => {
                    let scale = if matches!(attn, Attention::Sqrt) { 1.0 / (d as f64).sqrt() } else { 1.0 };
                    let w = softmax(&y.iter().map(|yi| dot(c, yi) * scale).collect::<Vec<_>>(), keep);
                    (0..d).map(|k| y.iter().zip(&w).map(|(yi, wi)| wi * yi[k]).sum()).collect()
                }
                Attention::Multihead(mh) => {
                    let p = |l: &nn::Linear| (to_mat(&l.ws), to_mat(&l.bs.as_ref().unwrap().unsqueeze(0))[0].clone());
                    let ((wq, bq), (wk, bk), (wv, bv), (wo, bo)) = (p(&mh.q_lin), p(&mh.k_lin), p(&mh.v_lin), p(&mh.out_lin));
                    let q = linear(&wq, &bq, c);
                    let ks: Mat = y.iter().map(|yi| linear(&wk, &bk, yi)).collect();
                    let vs: Mat = y.iter().map(|yi| linear(&wv, &bv, yi)).collect();
                    let dh = d / mh.heads as usize;
                    let mut out = vec![0.0; d];
                    for h in 0..mh.heads as usize {
                        let r = h * dh..(h + 1) * dh;
                        let logits: Vec<f64> =
                            ks.iter().map(|k| dot(&q[r.clone()], &k[r.clone()]) / (dh as f64).sqrt()).collect();
                        let w = softmax(&logits, keep);
                        for j in r.clone() {
                            out[j] = vs.iter().zip(&w).map(|(v, wi)| wi * v[j]).sum();
                        }
                    }
                    linear(&wo, &bo, &out)
                }
            };
            dot(c, &attended)
        })
        .collect()
}

fn check(kind: AttentionKind, m: i64, masked: bool) {
    let _g = tch::no_grad_guard();
    tch::manual_seed(m * 10 + kind as i64);
    let (d, n) = (32i64, 50i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let attn = Attention::new(vs.root(), AttentionSpec { kind, heads: 4 }, d);
    let y = Tensor::randn([1, m, d], (Kind::Float, Device::Cpu)) * 0.7;
    let cands = Tensor::randn([n, d], (Kind::Float, Device::Cpu)) * 0.7;
    // n_first-style masking: the last third of the codes are padding (never all of them).
    let keep: Vec<bool> = (0..m).map(|i| !masked || i == 0 || i < m - m / 3).collect();
    let mask = Tensor::from_slice(&keep).view([1, m]);
    let codes = ContextVectors { y: y.shallow_clone(), mask };
    let fast: Vec<f64> = Vec::try_from(score(&codes, &cands, &attn).to_kind(Kind::Double).view([-1])).unwrap();
    let slow = naive_scores(&attn, &to_mat(&y.squeeze_dim(0)), &keep, &to_mat(&cands));
    assert_eq!(fast.len(), n as usize);
    let worst = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-5, "{kind:?} m={m} masked={masked}: max |fast - naive| = {worst}");
    // The scores are not all alike, or the comparison would prove little.
    let spread = slow.iter().cloned().fold(f64::MIN, f64::max) - slow.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.1, "degenerate scores");
}

#[test]
fn kernel_matches_formula_for_every_attention_and_m() {
    for kind in [AttentionKind::Basic, AttentionKind::Sqrt, AttentionKind::Multihead] {
        for m in [1, 16, 64] {
            check(kind, m, false);
            if m > 1 {
                check(kind, m, true);
            }
        }
    }
}

#[test]
fn chunked_scoring_equals_one_pass() {
    let _g = tch::no_grad_guard();
    let attn = Attention::Sqrt;
    // Far more rows than one slice holds for 2 contexts × 8 codes.
    let n = polyrank::model::scoring::SCORE_CHUNK_FLOATS / 16 * 3 + 1000;
    let y = Tensor::randn([2, 8, 16], (Kind::Float, Device::Cpu));
    let cands = Tensor::randn([n, 16], (Kind::Float, Device::Cpu));
    let codes = ContextVectors { y, mask: Tensor::ones([2, 8], (Kind::Bool, Device::Cpu)) };
    let whole = score(&codes, &cands, &attn);
    assert_eq!(whole.size(), vec![2, n]);
    let tail = score(&codes, &cands.narrow(0, n - 1000, 1000), &attn);
    let diff = (whole.narrow(1, n - 1000, 1000) - tail).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn top_k_is_best_first_and_bounded() {
    let s = Tensor::from_slice(&[0.1f32, 3.0, -1.0, 2.5, 0.7]);
    assert_eq!(top_k(&s, 3), vec![(1, 3.0), (3, 2.5), (4, 0.7)]);
    assert_eq!(top_k(&s, 10).len(), 5);
    assert!(top_k(&s, 0).is_empty());
}

#[test]
fn a_batch_of_contexts_scores_as_each_alone() {
    let _g = tch::no_grad_guard();
    let vs = nn::VarStore::new(Device::Cpu);
    for kind in [AttentionKind::Basic, AttentionKind::Sqrt, AttentionKind::Multihead] {
        let attn = Attention::new(vs.root() / format!("{kind:?}"), AttentionSpec { kind, heads: 4 }, 16);
        let y = Tensor::randn([3, 8, 16], (Kind::Float, Device::Cpu));
        let mask = Tensor::from_slice(&[true, true, true, true, true, false, false, false]).view([1, 8]).repeat([3, 1]);
        let codes = ContextVectors { y, mask };
        let cands = Tensor::randn([200, 16], (Kind::Float, Device::Cpu));
        let all = score(&codes, &cands, &attn);
        for i in 0..3 {
            let one = score(&codes.select(i), &cands, &attn);
            let diff = (all.get(i) - one.squeeze_dim(0)).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{kind:?} context {i}: {diff}");
        }
    }
}
