"""Writes the TorchScript module polyrank calls for int8 scoring GEMMs (build.rs runs this).

tch exposes only ATen's own operators; oneDNN's int8 linear (`onednn::qlinear_pointwise`,
what PyTorch's x86 int8 inference uses: VNNI / AMX where the CPU has them, vpmaddubsw on
AVX2) is registered in libtorch under its own namespace, so a two-method TorchScript module
is the way in. Measured on this project's 2-core AVX2 machine at [100000, 384] x [384, 64]:
fp32 matmul 76.9 ms, this op 29.8 ms, exact int32 sums (max error 0.0);
`torch._int_mm` took 1953 ms there (no fast int8 kernel for it on AVX2).

usage: python scripts/qlinear_module.py OUT.pt
"""
import sys
from typing import List, Optional

import torch


class Int8Linear(torch.nn.Module):
    def forward(self, rows_u8: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        # rows_u8 holds int8 codes + 128; the int32 sums come back as fp32 (exact below 2^24).
        args: List[Optional[number]] = []  # noqa: F821 (TorchScript's number type)
        return torch.ops.onednn.qlinear_pointwise(
            rows_u8, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", args, "")

    @torch.jit.export
    def prepack(self, codes_i8: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(codes_i8, None)


if __name__ == "__main__":
    torch.jit.script(Int8Linear()).save(sys.argv[1])
