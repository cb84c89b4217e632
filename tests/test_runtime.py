"""runtime.py's precision rule on mocked hardware: --precision auto is bf16 where the device computes
bf16 natively (a CPU with AMX-BF16 or AVX512-BF16, a CUDA GPU that does not emulate it), float32
elsewhere; fp32 and bf16 force either."""
from pathlib import Path

import pytest
import torch

from runtime import cpu_bf16_instructions, resolve_precision

PLAIN_X86 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize("capabilities, expected", [
    ({**PLAIN_X86, "avx512_bf16": True, "amx_bf16": True}, ("bf16", "auto: the CPU has AMX_BF16 and AVX512_BF16")),
    ({**PLAIN_X86, "avx512_bf16": True}, ("bf16", "auto: the CPU has AVX512_BF16")),
    (PLAIN_X86, ("fp32", f"auto: no bf16 instructions on this CPU ({torch.backends.cpu.get_cpu_capability()})")),
    ({"architecture": "aarch64", "neon": True, "bf16": True}, ("fp32", None)),  # not measured: float32
])
def test_auto_on_a_cpu_follows_its_bf16_instructions(capabilities, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    precision, why = resolve_precision("auto", "cpu")
    assert precision == expected[0] and (expected[1] is None or why == expected[1])
    for forced in ("fp32", "bf16"):
        assert resolve_precision(forced, "cpu") == (forced, f"--precision {forced}")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_gpu_asks_for_native_bf16(native, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    expected = ("bf16", "auto: the GPU computes bf16") if native else ("fp32", "auto: the GPU emulates bf16")
    assert resolve_precision("auto", "cuda") == expected
    assert asked == [False]  # an emulated bf16 (compute capability below 8.0) does not count
    assert resolve_precision("fp32", "cuda:0") == ("fp32", "--precision fp32")


def test_without_torch_s_detection_the_cpu_flags_say_the_same(monkeypatch):
    """torch before get_capabilities: /proc/cpuinfo's flags (Linux), nothing claimed elsewhere."""
    detected = cpu_bf16_instructions()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert cpu_bf16_instructions() == (detected if Path("/proc/cpuinfo").is_file() else [])
