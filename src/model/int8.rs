//! The int8 scoring GEMM: oneDNN's int8 linear through a TorchScript module built from
//! `scripts/qlinear_module.py` at compile time (tch has no binding for that operator).
//! `rows_u8` are int8 codes + 128 (8 bits), `codes` are int8 in [−63, 63] (7 bits: on CPUs
//! without VNNI the kernel adds u8·s8 pairs in saturating int16, and 2·255·63 < 2¹⁵), so the
//! int32 sums are exact, returned as fp32 (exact below 2²⁴; |Σ| ≤ 127·63·d).

use std::cell::RefCell;
use tch::{CModule, IValue, Kind, Tensor};

static MODULE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qlinear.pt"));

thread_local! {
    // Loaded once per thread that scores (in the server, the inference thread).
    static LINEAR: RefCell<Option<Result<CModule, String>>> = const { RefCell::new(None) };
}

fn with_module<T>(f: impl FnOnce(&CModule) -> Result<T, String>) -> Result<T, String> {
    LINEAR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let module = slot.get_or_insert_with(|| {
            if MODULE.is_empty() {
                return Err("this build has no int8 module (scripts/qlinear_module.py did not run at build time)".into());
            }
            CModule::load_data(&mut std::io::Cursor::new(MODULE)).map_err(|e| format!("loading the int8 module: {e}"))
        });
        match module {
            Ok(m) => f(m),
            Err(e) => Err(e.clone()),
        }
    })
}

/// The context side, `[k, d]` int8 codes in [−63, 63], packed for the kernel.
pub struct Packed {
    packed: Tensor,
    ones: Tensor,
    zeros: Tensor,
}

pub fn prepack(codes: &Tensor) -> Result<Packed, String> {
    let k = codes.size()[0];
    let packed = with_module(|m| match m.method_is("prepack", &[IValue::Tensor(codes.to_kind(Kind::Int8).contiguous())]) {
        Ok(IValue::Tensor(t)) => Ok(t),
        Ok(_) => Err("the int8 module's prepack returned something else than a tensor".into()),
        Err(e) => Err(format!("int8 prepack: {e}")),
    })?;
    Ok(Packed { packed, ones: Tensor::ones([k], (Kind::Float, tch::Device::Cpu)), zeros: Tensor::zeros([k], (Kind::Int64, tch::Device::Cpu)) })
}

/// `[n, k]` fp32: row j, column i = Σ (rows_u8[j] − 128) · codes[i], exactly.
pub fn matmul(rows_u8: &Tensor, p: &Packed) -> Result<Tensor, String> {
    with_module(|m| {
        m.forward_ts(&[rows_u8.shallow_clone(), p.packed.shallow_clone(), p.ones.shallow_clone(), p.zeros.shallow_clone()])
            .map_err(|e| format!("int8 matmul: {e}"))
    })
}

/// Whether the int8 GEMM runs here (module present and the operator registered).
pub fn available() -> Result<(), String> {
    let codes = Tensor::ones([8, 16], (Kind::Int8, tch::Device::Cpu));
    let rows = Tensor::full([4, 16], 130, (Kind::Uint8, tch::Device::Cpu));
    let out = matmul(&rows, &prepack(&codes)?)?;
    let want = 2.0 * 16.0;
    match out.max().double_value(&[]) {
        v if v == want => Ok(()),
        v => Err(format!("the int8 GEMM gave {v} where {want} was expected")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_sums_are_exact() {
        available().expect("int8 GEMM available in the test build");
        let rows = Tensor::randint_low(-127, 128, [1000, 384], (Kind::Int64, tch::Device::Cpu));
        let codes = Tensor::randint_low(-63, 64, [64, 384], (Kind::Int64, tch::Device::Cpu));
        let got = matmul(&(&rows + 128).to_kind(Kind::Uint8), &prepack(&codes).unwrap()).unwrap();
        let want = rows.to_kind(Kind::Double).matmul(&codes.to_kind(Kind::Double).transpose(0, 1));
        assert_eq!((got.to_kind(Kind::Double) - want).abs().max().double_value(&[]), 0.0);
    }
}
