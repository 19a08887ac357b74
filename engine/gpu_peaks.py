"""Datasheet dense tensor-core peaks of the GPUs the engine is run on, by the name torch reports
(torch.cuda.get_device_name()): shown beside the measured peak that the training line's MFU
divides by (engine.progress), and the conventional MFU denominator in the benchmarks.

NVIDIA's datasheets give tensor-core rates with 2:4 structured sparsity and state that dense rates
are half of them; the table holds the dense rates. Patterns are matched against
torch.cuda.get_device_name(), the longest first ("NVIDIA H100 PCIe" is not an H100 SXM).
"""
from __future__ import annotations

# Card name pattern -> (document, its column, BF16 and FP8 tensor-core TFLOP/s as printed there: with
# sparsity; None: no FP8 tensor cores). B200: NVIDIA's HGX B200 figures for 8 GPUs (FP16/BF16 36, FP8
# 72 PFLOPS with sparsity), per GPU.
_PRINTED = {
    "H100 PCIe": ("NVIDIA H100 Tensor Core GPU datasheet", "H100 PCIe", 1513, 3026),
    "H100 NVL": ("NVIDIA H100 Tensor Core GPU datasheet", "H100 NVL", 1671, 3341),
    "H100": ("NVIDIA H100 Tensor Core GPU datasheet", "H100 SXM", 1979, 3958),
    "H800": ("NVIDIA H800 Tensor Core GPU datasheet", "H800 SXM", 1979, 3958),
    "GH200": ("NVIDIA GH200 Grace Hopper Superchip datasheet", "GH200", 1979, 3958),
    "H200 NVL": ("NVIDIA H200 Tensor Core GPU datasheet", "H200 NVL", 1671, 3341),
    "H200": ("NVIDIA H200 Tensor Core GPU datasheet", "H200 SXM", 1979, 3958),
    "A100": ("NVIDIA A100 Tensor Core GPU datasheet", "A100 SXM and PCIe", 624, None),
    "B200": ("NVIDIA HGX B200 specifications", "B200, per GPU", 4500, 9000),
}
# name pattern -> (dense bf16 TFLOP/s, dense fp8 TFLOP/s or None, source)
DATASHEET = {name: (bf16 / 2, fp8 / 2 if fp8 else None,
                    f"{doc}, {column}: BF16 {bf16:,}"
                    + (f" and FP8 {fp8:,} TFLOPS with sparsity" if fp8 else " TFLOPS with sparsity, no FP8"))
             for name, (doc, column, bf16, fp8) in _PRINTED.items()}


def datasheet_peak(device: str) -> tuple[float, float | None, str] | None:
    """(dense bf16, dense fp8 or None, source) for a CUDA device name; None for a card not in the table."""
    found = [k for k in DATASHEET if k.lower() in device.lower()]
    return DATASHEET[max(found, key=len)] if found else None
