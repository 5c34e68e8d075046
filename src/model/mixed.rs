//! Mixed precision for training on CPU: the encoder's dense layers multiply in bfloat16 while
//! weights, gradients, the optimizer, residual sums, LayerNorm and softmax stay fp32 (what
//! PyTorch's CPU autocast does; tch exposes only the CUDA autocast switch, so it is done here).
//!
//! Why: the dense layers are nearly all of a BERT step's work, and CPUs with AVX512-BF16
//! (Zen 4, Sapphire Rapids) multiply bf16 at twice the fp32 rate. On this project's 2-core
//! Zen 4 the training recipe went from 20.1 to 30.5 pairs/s (scripts/train_throughput.sh).
//!
//! Scoped like autocast: `with_matmul_kind(Some(Kind::BFloat16), || …)` sets it for the
//! calling thread and restores the previous value after, so serving, evaluation and the
//! validation passes of a bf16 training run keep their fp32 outputs.

use std::cell::Cell;
use tch::{nn, nn::Module, Kind, Tensor};

thread_local! {
    static MATMUL_KIND: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Runs `f` with the encoder's dense layers multiplying in `kind` (None: in the weights' kind).
pub fn with_matmul_kind<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Kind>);
    impl Drop for Restore {
        fn drop(&mut self) {
            MATMUL_KIND.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(MATMUL_KIND.with(|k| k.replace(kind)));
    f()
}

/// `layer.forward(xs)`, multiplied in the scoped kind when one is set and `xs` is fp32. The
/// result is fp32 again: the casts are in the autograd graph, so fp32 weights get fp32
/// gradients.
pub(crate) fn linear(layer: &nn::Linear, xs: &Tensor) -> Tensor {
    match MATMUL_KIND.with(Cell::get) {
        Some(kind) if xs.kind() == Kind::Float && kind != Kind::Float => {
            let bias = layer.bs.as_ref().map(|b| b.to_kind(kind));
            xs.to_kind(kind).linear(&layer.ws.to_kind(kind), bias.as_ref()).to_kind(Kind::Float)
        }
        _ => layer.forward(xs),
    }
}
