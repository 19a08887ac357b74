"""MFU against two peaks: the card's measured dense bf16 GEMM rate (engine.progress.peak_tflops, an
8192^3 matmul; what the training line's MFU divides by, or $POLAR_PEAK_TFLOPS where set) and the
datasheet's dense peak, the conventional denominator. Issue 10's target (>= 45% bf16 MFU) is read
against the datasheet: a measured GEMM reaches only part of the datasheet rate (clocks under a power
cap), so the same run reads higher against the measured peak.

NVIDIA's datasheets give tensor-core rates with 2:4 structured sparsity and state that dense rates
are half of them; the table holds the dense rates. Patterns are matched against
torch.cuda.get_device_name(), the longest first ("NVIDIA H100 PCIe" is not an H100 SXM).
"""
from __future__ import annotations

import os

TARGET_BASIS = "datasheet"  # which peak issue 10's ">= 45% bf16 MFU" is read against
MFU_TARGET = 0.45

# Card name pattern -> (document, its column, BF16 and FP8 tensor-core TFLOP/s as printed there: with
# sparsity; None: no FP8 tensor cores). B200: NVIDIA's HGX B200 figures for 8 GPUs (FP16/BF16 36, FP8
# 72 PFLOPS with sparsity), per GPU.
_PRINTED = {
    "H100 PCIe": ("NVIDIA H100 Tensor Core GPU datasheet", "H100 PCIe", 1513, 3026),
    "H100 NVL": ("NVIDIA H100 Tensor Core GPU datasheet", "H100 NVL", 1671, 3341),
    "H100": ("NVIDIA H100 Tensor Core GPU datasheet", "H100 SXM", 1979, 3958),
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


def measured_basis() -> str:
    """What the measured-peak column divides by: the GEMM measurement, or $POLAR_PEAK_TFLOPS (which
    replaces it in engine.progress.resolve_peak)."""
    from engine.progress import PEAK_ENV

    value = os.environ.get(PEAK_ENV)
    return f"{PEAK_ENV}={value}" if value else "measured 8192^3 bf16 GEMM"


def datasheet_mfu(tflops_per_gpu: float | None, device: str, fp8: bool = False) -> float | None:
    """A model FLOP rate per GPU over the card's datasheet dense peak (bf16, or fp8 with `fp8`); None
    where the rate or the peak is unknown (no GPU, a card not in DATASHEET, no fp8 tensor cores)."""
    sheet = datasheet_peak(device)
    peak = sheet and sheet[1 if fp8 else 0]
    if tflops_per_gpu is None or tflops_per_gpu != tflops_per_gpu or not peak:
        return None
    return tflops_per_gpu / peak


def peaks_line(device: str, measured_peak: float | None, basis: str | None = None) -> str:
    """One line for a benchmark's header: both peaks and which one the MFU target is read against;
    `basis` says where the measured peak came from (default: measured_basis())."""
    sheet = datasheet_peak(device)
    measured = (f"{measured_peak:.0f} TFLOP/s ({basis or measured_basis()})" if measured_peak
                else "none (no GPU)")
    datasheet = (f"{sheet[0]:g} TFLOP/s dense bf16 ({sheet[2]}; dense is half)" if sheet
                 else f"none ({device!r} is not in benchmarks/datasheet_peaks.py)")
    return (f"MFU peaks: measured {measured}; datasheet {datasheet}. Issue 10's target, >= {MFU_TARGET:.0%} bf16 "
            f"MFU, is read against the {TARGET_BASIS} peak (the conventional figure); against a measured peak "
            "below the datasheet's the same run reads higher.")
