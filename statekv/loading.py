"""Find a checkpoint (local directory or Hugging Face cache) and load it for statekv."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statekv.errors import ModelError, UsageError

if TYPE_CHECKING:  # torch loads only when a model or tensor is needed (fast small commands)
    import torch

# `--dtype` names -> torch dtype names, and bytes per element (known without importing torch).
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}
ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def accelerator_possible() -> bool:
    """False only when no GPU can be visible to torch here (no NVIDIA/AMD device nodes, not
    macOS): then 'auto' means the CPU and torch need not be imported to know it."""
    if sys.platform == "darwin" or os.name == "nt":
        return True
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd"):
        return True
    return os.path.isdir("/proc/driver/nvidia")


def device_type(device: str = "auto") -> str:
    """'cpu', 'cuda' or 'mps': the type `resolve_device(device)` gives, importing torch only
    when an accelerator may be there."""
    if device == "cpu" or (device == "auto" and not accelerator_possible()):
        return "cpu"
    return resolve_device(device).type


def element_size(dtype: str, device: str = "auto") -> int:
    """Bytes per weight element of `--dtype` on `device` ('auto' as `resolve_dtype` picks)."""
    return ELEMENT_SIZES[dtype_name(dtype, device)]


def dtype_name(dtype: str, device: str = "auto") -> str:
    """The torch dtype name (float32, bfloat16, float16) weights would be loaded in."""
    if dtype == "auto":
        kind = device_type(device)
        if kind == "cpu":
            return "bfloat16" if cpu_has_native_bf16() else "float32"
        if kind != "cuda":
            return "float32"
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


# CPU flags (Linux /proc/cpuinfo) of native bfloat16 matrix instructions: AVX512-BF16, AMX.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# `--dtype auto` on the CPU: unset (or "auto") = the flags, then a timed matmul where torch is
# loaded; "1" = the flags alone; "0" = always float32.
CPU_BF16_ENV = "STATEKV_CPU_BF16"
CPUINFO = "/proc/cpuinfo"
# bfloat16 must multiply at least this much faster than float32 for `auto` to pick it. Seen:
# AMD EPYC (AVX512-BF16) 2.7x; an Intel Xeon with AVX512-BF16 and no AMX 0.74x (slower).
BF16_MIN_SPEEDUP = 1.25


def cpu_flags(path: str | None = None) -> set[str]:
    """The CPU's feature flags as the kernel lists them (empty where there is no such file)."""
    try:
        with open(path or CPUINFO) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup() -> float:
    """float32 over bfloat16 seconds of one 512x1024x1024 matrix product on this CPU (best of
    3 each, ~50 ms in all, once per process): whether the instructions are there *and* torch's
    kernels use them well. Having the flag is not enough: on some CPUs with AVX512-BF16 the
    bfloat16 product is slower than float32's."""
    import time

    import torch

    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(512, 1024, dtype=dtype)
        b = torch.ones(1024, 1024, dtype=dtype)
        a @ b  # first call: kernel choice, allocation
        times = []
        for _ in range(3):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        best[dtype] = min(times)
    return best[torch.float32] / max(1e-9, best[torch.bfloat16])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16) and, where
    torch is loaded, measurably faster than float32 (`bf16_matmul_speedup`).

    torch's reported capability must be AVX512 (or better) for its kernels to use them; on
    CPUs without these instructions bfloat16 is emulated and slower than float32.
    """
    setting = os.environ.get(CPU_BF16_ENV, "auto").lower()
    if setting in ("0", "false", "no"):
        return False
    if "torch" in sys.modules:  # what torch's kernels will use (ATEN_CPU_CAPABILITY may lower it)
        capability = str(sys.modules["torch"].backends.cpu.get_cpu_capability()).upper()
    else:  # small commands plan without torch: the environment override, else the CPU flags
        capability = os.environ.get("ATEN_CPU_CAPABILITY", "avx512").upper()
    if not capability.startswith("AVX512"):
        return False
    if not cpu_flags() & set(CPU_BF16_FLAGS):
        return False
    if setting in ("1", "true", "yes") or "torch" not in sys.modules:
        return True
    return bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it and on CPUs with native bf16 matrix
    instructions (AVX512-BF16 / AMX) that run a bf16 product faster than float32's (timed once
    per process), float32 elsewhere."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPE_NAMES[dtype])


# Checkpoints shipped inside the wheel: model id -> folder below the `statekv` package.
# Resolved by path, so loading never imports the code that trained or evaluates them.
BUNDLED: dict[str, tuple[str, ...]] = {"statekv/demo": ("demo", "checkpoint"),
                                       "statekv/demo-lockers": ("demo", "lockers_checkpoint")}
# how to rebuild each bundled checkpoint from a source checkout (its training settings are in
# its training.json)
RETRAIN = {"statekv/demo": "python tools/train_demo.py",
           "statekv/demo-lockers": "python tools/train_demo.py --task lockers "
                                   "(the settings in the folder's training.json)"}


def bundled_checkpoint(model: str) -> str:
    """The directory of a checkpoint shipped inside the installed package."""
    from importlib import resources

    folder = resources.files("statekv").joinpath(*BUNDLED[model])
    path = Path(str(folder))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelError(f"the bundled model {model} is missing from {path}; reinstall statekv "
                         f"(or retrain it with: {RETRAIN[model]})")
    return str(path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_cache_dirs() -> list[Path]:
    """Where the Hugging Face cache may be (the hub's own environment variables, in order)."""
    dirs = [os.environ.get(name) for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return [Path(d).expanduser() for d in dirs if d] + [Path(home).expanduser() / "hub"]


def maybe_cached(model: str) -> bool:
    """False when a hub id is certainly not in the local cache (checked without importing
    huggingface_hub, so `info` on a preset whose weights are not here answers at once)."""
    if model in BUNDLED or Path(model).expanduser().is_dir():
        return True
    folder = "models--" + model.replace("/", "--")
    return any((d / folder).is_dir() for d in hub_cache_dirs())


def resolve_checkpoint(model: str, revision: str | None = None) -> str:
    """A local directory as is; a hub id from the local cache first, downloaded only if allowed."""
    if model in BUNDLED:  # a checkpoint shipped inside the package
        return bundled_checkpoint(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{model} is a directory but has no config.json: not a checkpoint")
        return str(path)
    if path.suffix or model.startswith((".", "/", "~")):
        raise ModelError(f"model directory not found: {model}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception:
        if _offline():
            raise ModelError(
                f"model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"fetch it first on a connected machine: hf download {model}"
            ) from None
    try:
        return snapshot_download(model, revision=revision)
    except Exception as exc:
        raise ModelError(
            f"could not download {model} ({type(exc).__name__}); check the id, your network, "
            f"or download it with: hf download {model}"
        ) from None


def read_config(checkpoint: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {checkpoint}: {exc}") from None


def load_weights(checkpoint: str, device: torch.device, dtype: torch.dtype,
               trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """(config, model, processor) loaded with the text model on statekv's attention."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import statekv.attention  # noqa: F401  (registers the attention function)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the library never prints; progress is the caller's

    config = read_config(checkpoint, trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            checkpoint, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation={"text_config": "statekv", "vision_config": "sdpa"},
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"failed to load {checkpoint}: {exc}") from None
    model.to(device).eval()
    return config, model, processor


# Model identity -------------------------------------------------------------------------
WEIGHTS_SAMPLE_BYTES = 1 << 20  # read from the start and the end of each weights file


def weights_hash(checkpoint: str) -> str:
    """A fingerprint of a checkpoint without reading all its weights: blake2b over, for each
    file of the directory sorted by name, its name and size, and then either its content
    (the config, tokenizer, processor and chat-template files: *.json, *.jinja, *.txt,
    *.model, whole) or, for weights (*.safetensors, *.bin), its first and last MiB. A
    safetensors file starts with its tensor index (names, dtypes, shapes, offsets), so the
    head covers the layout and the tail real data: a retrained or converted checkpoint
    changes them, and so does another tokenizer or template. Reads ~2 MiB per weights file."""
    import hashlib

    root = Path(checkpoint)
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in root.iterdir() if p.is_file()):
        whole = file.suffix in (".json", ".jinja", ".txt", ".model")
        if not whole and file.suffix not in (".safetensors", ".bin"):
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if whole:
                digest.update(handle.read())
                continue
            digest.update(handle.read(WEIGHTS_SAMPLE_BYTES))
            if size > 2 * WEIGHTS_SAMPLE_BYTES:
                handle.seek(size - WEIGHTS_SAMPLE_BYTES)
                digest.update(handle.read(WEIGHTS_SAMPLE_BYTES))
    return digest.hexdigest()


def parameters_hash(module: torch.nn.Module, sample: int = 256) -> str:
    """A fingerprint of in-memory weights (a model not loaded from a directory): each
    parameter's name, dtype, shape and its first `sample` values."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        head = tensor.detach().reshape(-1)[:sample].cpu().contiguous()
        digest.update(head.view(torch.uint8).numpy().tobytes() if head.numel() else b"")
    return digest.hexdigest()
