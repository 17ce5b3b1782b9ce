"""Hardware the planner knows: accelerator presets from their datasheets, a custom spec, and this CPU (measured).

Figures are per device. `bf16_tflops` is the dense (no 2:4 sparsity) tensor-core rate for bf16/fp16 inputs with
fp32 accumulation, the rate AMP and pure-bf16 training run at; `fp32_tflops` is plain FP32 (PyTorch leaves TF32
matmuls off by default, torch.backends.cuda.matmul.allow_tf32 = False since 1.12, so fp32 training runs here);
`tf32_tflops` is kept for users who turn TF32 on. `memory_gib` is the total nvidia-smi reports (what an
allocation can grow into before the CUDA context and the allocator take their part, see plan.py).
Prices are indicative on-demand US$ per device-hour from public cloud price lists (2025); they move, so
override with a custom spec (`custom:memory=80,bf16=989,bandwidth=3350,cost=2.5`).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

from gptforge.errors import GptforgeError

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """One device: memory, peak dense matmul rates, memory bandwidth, price, and its links to its peers."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    tf32_tflops: float
    bandwidth_gbs: float  # device memory bandwidth, GB/s (1e9 bytes)
    usd_per_hour: float
    interconnect_gbs: float  # per-device bandwidth to the other devices of its node (NVLink or PCIe), GB/s
    context_gib: float = 1.0  # CUDA context + kernels, held before the first tensor (see plan.py)
    source: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_flops(self, precision: str) -> float:
        """Peak dense FLOP/s for the matmuls of a run in this precision (fp32, bf16, fp16, bf16-pure)."""
        return (self.fp32_tflops if precision == "fp32" else self.bf16_tflops) * 1e12


# Sources: NVIDIA datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet, 2021; H100: "NVIDIA H100 Tensor Core
# GPU" datasheet, 2023, SXM and PCIe columns; H200: "NVIDIA H200 Tensor Core GPU" product page, SXM; L4: "NVIDIA L4
# Tensor Core GPU" datasheet; RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper appendix, FP16/BF16 tensor with
# FP32 accumulate; RTX 3090: "NVIDIA Ampere GA102 GPU Architecture" whitepaper, same column). The sparse figures
# on those sheets are twice these. A10G (AWS g5) has no public NVIDIA datasheet: 70 dense bf16 TFLOP/s and
# 600 GB/s as tabulated by Baseten, "NVIDIA A10 vs A10G for ML model inference" (2023). Interconnect: NVLink
# per-GPU bandwidth (A100 600 GB/s, H100/H200 SXM 900 GB/s); the PCIe cards use PCIe 4.0/5.0 x16 (32/64 GB/s).
# Prices: on-demand list prices of Lambda, AWS (g5, g6), GCP (g2) and RunPod community cloud, 2025.
PRESETS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-40gb", 40.0, 312, 19.5, 156, 1555, 1.29, 600, source="NVIDIA A100 datasheet (SXM4 40GB)"),
    Hardware("a100-80gb", 80.0, 312, 19.5, 156, 2039, 1.79, 600, source="NVIDIA A100 datasheet (SXM4 80GB)"),
    Hardware("h100-sxm", 79.6, 989, 67, 495, 3350, 2.99, 900, source="NVIDIA H100 datasheet (SXM5)"),
    Hardware("h100-pcie", 79.6, 756, 51, 378, 2000, 2.49, 64, source="NVIDIA H100 datasheet (PCIe)"),
    Hardware("h200", 140.4, 989, 67, 495, 4800, 3.79, 900, source="NVIDIA H200 product page (SXM)"),
    Hardware("l4", 22.5, 121, 30.3, 60, 300, 0.80, 32, source="NVIDIA L4 datasheet"),
    Hardware("a10g", 22.5, 70, 31.2, 35, 600, 1.01, 32, source="Baseten A10 vs A10G (AWS g5)"),
    Hardware("rtx-4090", 24.0, 165.2, 82.6, 82.6, 1008, 0.40, 32, source="NVIDIA Ada whitepaper (RTX 4090)"),
    Hardware("rtx-3090", 24.0, 71, 35.6, 35.6, 936, 0.25, 32, source="NVIDIA GA102 whitepaper (RTX 3090)"),
)}

CUSTOM_KEYS = {"memory": "memory_gib", "bf16": "bf16_tflops", "fp32": "fp32_tflops", "bandwidth": "bandwidth_gbs",
               "cost": "usd_per_hour", "interconnect": "interconnect_gbs", "context": "context_gib"}


def known_names() -> list[str]:
    return [*PRESETS, "cpu", "custom:memory=GIB,bf16=TFLOPS,bandwidth=GBS,cost=USD_PER_HOUR"]


def get_hardware(name: str) -> Hardware:
    """A preset by exact name, `cpu` (this machine, measured once per process), or a `custom:k=v,...` spec."""
    if name == "cpu":
        return cpu_hardware()
    if name.startswith("custom:"):
        return parse_custom(name)
    if name not in PRESETS:
        raise GptforgeError(f"unknown hardware {name!r}; known: {', '.join(known_names())}")
    return PRESETS[name]


def parse_custom(spec: str) -> Hardware:
    """`custom:memory=24,bf16=100,bandwidth=900,cost=0.5` (GiB, TFLOP/s, GB/s, $/hour; fp32 defaults to bf16/8,
    interconnect to 32 GB/s, context to 1 GiB)."""
    values: dict[str, float] = {}
    for item in spec.removeprefix("custom:").split(","):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in CUSTOM_KEYS:
            raise GptforgeError(f"bad custom hardware item {item!r}; write key=value with keys {', '.join(CUSTOM_KEYS)}, "
                                f"e.g. custom:memory=24,bf16=100,bandwidth=900,cost=0.5")
        try:
            values[CUSTOM_KEYS[key.strip()]] = float(value)
        except ValueError:
            raise GptforgeError(f"custom hardware {key}={value!r}: expected a number") from None
    missing = [k for k in ("memory", "bf16", "bandwidth") if CUSTOM_KEYS[k] not in values]
    if missing:
        raise GptforgeError(f"custom hardware needs {', '.join(missing)} (e.g. custom:memory=24,bf16=100,bandwidth=900)")
    if any(v < 0 for v in values.values()) or values["memory_gib"] <= 0 or values["bf16_tflops"] <= 0:
        raise GptforgeError("custom hardware values must be positive")
    values.setdefault("fp32_tflops", values["bf16_tflops"] / 8)
    values.setdefault("usd_per_hour", 0.0)
    values.setdefault("interconnect_gbs", 32.0)
    return Hardware("custom", tf32_tflops=values["fp32_tflops"], source=spec, **values)


def _total_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):  # not POSIX: fall back to an assumption the user can override
        return 16.0


def probe_matmul_flops(dtype_name: str, n: int = 1024, min_seconds: float = 0.15, device: str = "cpu") -> float:
    """Achieved FLOP/s of an n x n x n matmul (2n^3 FLOPs each), best of repeated runs over ~min_seconds."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: thread pool and kernel selection
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def probe_copy_bandwidth(mib: int = 64, min_seconds: float = 0.15, device: str = "cpu") -> float:
    """Achieved bytes/s of a large tensor copy, counting the read and the write (STREAM "copy" convention)."""
    import torch

    src = torch.ones(mib * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    dst.copy_(src)
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


@functools.cache
def cpu_hardware() -> Hardware:
    """This CPU as a planner device: matmul rates and copy bandwidth measured now (~1 s), RAM from the OS.

    A CPU has no separate device memory, so `memory_gib` is all of RAM and nothing is set aside for a context.
    """
    return Hardware(
        "cpu", memory_gib=round(_total_ram_gib(), 1),
        bf16_tflops=probe_matmul_flops("bf16") / 1e12, fp32_tflops=probe_matmul_flops("fp32") / 1e12,
        tf32_tflops=0.0, bandwidth_gbs=probe_copy_bandwidth() / 1e9, usd_per_hour=0.0, interconnect_gbs=0.0,
        context_gib=0.0, source="measured by gptforge.hardware.cpu_hardware()",
    )


# --- the device this process runs on ------------------------------------------------------------------------
# torch is imported inside these functions, as in the probes above, so that `gptforge plan` (which reads only the
# presets) starts without it.

def resolve_device(name: str | None = "auto", flag: str = "--device"):
    """The torch.device a device setting names: `auto` (or None) picks CUDA, then Apple's MPS, then the CPU.

    Asking for CUDA where there is none is an error naming `flag`, the setting the user gave."""
    import torch

    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GptforgeError(f"{flag} is {name!r} but no CUDA device is available; use {flag} cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise GptforgeError(f"{flag}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


# Substrings of torch.cuda.get_device_name() -> preset, most specific first.
CUDA_NAMES = [("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("H200", "h200"), ("A100-SXM4-40GB", "a100-40gb"),
              ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"), ("L4", "l4"), ("A10G", "a10g"),
              ("4090", "rtx-4090"), ("3090", "rtx-3090")]


def cuda_preset(device) -> Hardware | None:
    """The datasheet preset of a CUDA device, recognised from its name; None if it is not one of PRESETS."""
    import torch

    name = torch.cuda.get_device_name(device)
    return next((PRESETS[p] for key, p in CUDA_NAMES if key in name), None)


def device_hardware(device, name: str | None = None) -> Hardware:
    """The planner's hardware for a torch device: given by name, recognised from the CUDA name, or this CPU."""
    if name is not None:
        return get_hardware(name)
    if device.type == "cpu":
        return cpu_hardware()
    hw = cuda_preset(device) if device.type == "cuda" else None
    if hw is None:
        import torch

        what = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise GptforgeError(f"no hardware preset for {what!r}; give --hardware custom:memory=...,bf16=...,bandwidth=...")
    return hw


def device_peak_flops(device, precision: str) -> float | None:
    """Dense peak FLOP/s of a device for a run's matmuls, the denominator of MFU; None when unknown (MFU is then
    omitted rather than guessed). CUDA devices are looked up in the datasheet presets (fp32 runs there use TF32,
    which train() turns on); a CPU's peak is measured by a short matmul probe (cpu_hardware), so its MFU is
    relative to what this CPU's matmul achieves."""
    if device.type == "cpu":
        hw = cpu_hardware()
        return (hw.fp32_tflops if precision == "fp32" else hw.bf16_tflops) * 1e12
    hw = cuda_preset(device) if device.type == "cuda" else None
    if hw is None:
        return None
    return (hw.tf32_tflops if precision == "fp32" else hw.bf16_tflops) * 1e12
