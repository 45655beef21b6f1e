"""Find a checkpoint (local directory or Hugging Face cache) and load it for statekv."""

from __future__ import annotations

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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it and float32 elsewhere."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPE_NAMES[dtype])


# Checkpoints shipped inside the wheel: model id -> folder below the `statekv` package.
# Resolved by path, so loading never imports the code that trained or evaluates them.
BUNDLED: dict[str, tuple[str, ...]] = {"statekv/demo": ("demo", "checkpoint")}


def bundled_checkpoint(model: str) -> str:
    """The directory of a checkpoint shipped inside the installed package."""
    from importlib import resources

    folder = resources.files("statekv").joinpath(*BUNDLED[model])
    path = Path(str(folder))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelError(f"the bundled model {model} is missing from {path}; reinstall statekv "
                         f"(or retrain the demo model with: python tools/train_demo.py)")
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
