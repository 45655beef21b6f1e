"""Prefill files: a Session's detailed cache and everything answering needs, in one file.

    session = model.prefill("movie.mp4", budget=4096)
    session.save("movie.skv")                  # atomic: temporary file, fsync, rename
    later = model.open("movie.skv")            # no video, no vision tower, no prefill
    later.ask("who enters the room?")

The file is a safetensors file (docs/prefill-files.md): one tensor of keys and one of
values per decoder layer (only the `seen` tokens), and in the header's `__metadata__` one
JSON string (format version, model identity, settings, video identity, prompt layout,
frame timestamps, the adapter's answer state, stats of the prefill, a checksum of every
tensor) plus that string's own checksum. Loading reads the header, refuses a file from
another model or format version before touching a tensor, then maps the file and copies
one layer at a time into the cache (on CUDA: one layer of host memory at a time), checking
each tensor's checksum. Nothing in the file is executed: JSON and raw tensor bytes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from statekv.errors import InputError, UsageError

# Sessions and models are passed in (statekv.session imports this module, not the reverse).
Session = Model = Any

FORMAT = "statekv-prefill"
FORMAT_VERSION = 1
EXTENSION = ".skv"
META_KEY = "statekv"
CHECKSUM_KEY = "statekv_sha256"
ALIGN = 8  # safetensors pads its header so tensor data starts 8-byte aligned
MAX_HEADER = 100 * 2**20

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Video identity: the whole file is hashed up to this size; above it, samples (see below).
FULL_HASH_BYTES = 32 * 2**20
SAMPLE_BYTES = 2**20
SAMPLES = 16


def is_prefill_file(path: str) -> bool:
    return str(path).lower().endswith(EXTENSION)


# Video identity -----------------------------------------------------------------------
def video_identity(path: str) -> dict[str, Any]:
    """Size, mtime and a content hash of a video file (what a cache hit must match).

    sha256 over the whole file up to 32 MiB; above, over its size, its first and last 8 MiB
    and 16 evenly spaced 1 MiB samples (a re-encode or edit changes sizes or sampled bytes;
    reads at most 32 MiB however long the video is).
    """
    try:
        st = os.stat(path)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if st.st_size <= FULL_HASH_BYTES:
                method = "sha256"
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            else:
                method = "sha256-sampled-v1"
                digest.update(str(st.st_size).encode())
                edge = 8 * SAMPLE_BYTES
                digest.update(handle.read(edge))
                step = (st.st_size - 2 * edge) // (SAMPLES + 1)
                for index in range(1, SAMPLES + 1):
                    handle.seek(edge + index * step)
                    digest.update(handle.read(SAMPLE_BYTES))
                handle.seek(st.st_size - edge)
                digest.update(handle.read(edge))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return {"size_bytes": st.st_size, "mtime": st.st_mtime, "content_hash": digest.hexdigest(),
            "hash_method": method}


# Writing --------------------------------------------------------------------------------
def _layer_tensors(session: "Session"):
    """(name, tensor) of every layer's keys and values: the `seen` tokens, (kv_heads, t, d)."""
    for index, layer in enumerate(session.state.cache.layers):
        seen = layer.seen
        yield f"layer.{index}.keys", layer.keys[0, :, :seen]
        yield f"layer.{index}.values", layer.values[0, :, :seen]


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    host = tensor.detach().to("cpu").contiguous()
    return memoryview(host.view(torch.uint8).numpy()).cast("B")


def metadata(session: "Session") -> dict[str, Any]:
    """The header's JSON record (without checksums) for a session."""
    import statekv

    state, cache, model = session.state, session.state.cache, session.model
    first = cache.layers[0]
    if first.keys is None:
        raise UsageError("this session holds no cache to save (nothing was prefilled)")
    _, kv_heads, capacity, head_dim = first.keys.shape
    stats = session.stats.to_dict()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "statekv_version": statekv.__version__,
        "model": {"name": model.name, "revision": model.revision,
                  # a local directory as an absolute path, so the file answers from anywhere
                  "checkpoint": (str(Path(model.checkpoint).resolve())
                                 if model.checkpoint and Path(model.name).is_dir() else None),
                  "weights_hash": model.weights_hash, "family": model.family,
                  "dtype": model.dtype},
        "settings": session.settings.to_dict(),
        "options": session.options,
        "video": session.video,
        "prompt": {"prefix": state.prompt.prefix, "suffix": state.prompt.suffix},
        "plan": state.plan,
        "adapter_state": state.adapter_state,
        "result": {"frames": state.frames, "frame_timestamps": state.frame_timestamps,
                   "chunk_tokens": state.chunk_tokens, "warnings": state.warnings,
                   "rotary_length": state.rotary_length},
        "tokens_per_frame": stats["tokens_per_frame"],
        "cache": {"layers": len(cache.layers), "tokens": cache.detailed_tokens,
                  "video_tokens": cache.video_tokens, "pinned": first.pinned,
                  "capacity": capacity, "kv_heads": kv_heads, "head_dim": head_dim,
                  "dtype": str(first.keys.dtype).removeprefix("torch."),
                  "attention": cache.attention, "policy": cache.policy.name,
                  "max_carried": [layer.max_carried for layer in cache.layers]},
        "stats": stats,
    }


def save(session: "Session", path: str) -> int:
    """Write `session` to `path` atomically (temporary file in the same folder, fsync,
    rename); returns the file's size. Memory beyond the cache: one layer on the host."""
    meta = metadata(session)
    tensors = list(_layer_tensors(session))
    index: dict[str, Any] = {}
    checksums: dict[str, str] = {}
    offset = 0
    for name, tensor in tensors:  # pass 1: checksums and offsets (one layer on the host)
        data = _host_bytes(tensor)
        checksums[name] = hashlib.sha256(data).hexdigest()
        index[name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    meta["checksums"] = checksums
    text = json.dumps(meta, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    header = {"__metadata__": {META_KEY: text,
                               CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()}, **index}
    head = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary new file (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(head)))
            handle.write(head)
            for _, tensor in tensors:  # pass 2: the bytes, one layer at a time
                handle.write(_host_bytes(tensor))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)
    return target.stat().st_size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


from statekv.accounting import prefill_file_header_bytes as header_bytes  # noqa: E402,F401 (its old name)


# Reading --------------------------------------------------------------------------------
def read_metadata(path: str) -> dict[str, Any]:
    """The header's JSON record, checked: format, version and its own checksum (InputError)."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            if len(raw) < 8:
                raise InputError(f"{name} is not a statekv prefill file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER or 8 + length > size:
                raise InputError(f"{name} is truncated or not a statekv prefill file")
            head = handle.read(length)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        header = json.loads(head)
        text = header["__metadata__"][META_KEY]
        checksum = header["__metadata__"][CHECKSUM_KEY]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{name} is not a statekv prefill file (its header is damaged or "
                         f"missing)") from None
    if hashlib.sha256(text.encode()).hexdigest() != checksum:
        raise InputError(f"{name} is corrupted: its header does not match its checksum")
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise InputError(f"{name} is not a statekv prefill file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{name} was written by a newer statekv (prefill format {version}; "
                         f"this statekv reads up to {FORMAT_VERSION}): upgrade statekv")
    data = 8 + length
    end = max((entry["data_offsets"][1] for key, entry in header.items()
               if key != "__metadata__"), default=0)
    if size < data + end:
        raise InputError(f"{name} is truncated ({size} bytes, the header says "
                         f"{data + end})")
    meta["_index"] = {key: entry for key, entry in header.items() if key != "__metadata__"}
    return meta


def mismatch(meta: dict[str, Any], model: "Model") -> list[str]:
    """What differs between the file's model and `model` (empty when it may answer)."""
    saved = meta["model"]
    here = {"family": model.family, "dtype": model.dtype, "weights_hash": model.weights_hash,
            "revision": model.revision}
    differences = []
    for key in ("family", "dtype"):
        if saved.get(key) != here[key]:
            differences.append(f"{key} {here[key]} here, {saved.get(key)} in the file")
    if saved.get("revision") and here["revision"] and saved["revision"] != here["revision"]:
        differences.append(f"revision {here['revision']} here, {saved['revision']} in the file")
    if not differences and saved.get("weights_hash") != here["weights_hash"]:
        differences.append(f"weights {here['weights_hash'][:12]} ({model.name}) here, "
                           f"{str(saved.get('weights_hash'))[:12]} ({saved.get('name')}) "
                           f"in the file")
    return differences


def check_model(meta: dict[str, Any], model: "Model", path: str) -> None:
    differences = mismatch(meta, model)
    if not differences:
        return
    stored = meta["model"]
    if differences[0].startswith("weights") and stored.get("name") == model.name:
        advice = "the checkpoint changed since: prefill the video again"
    else:
        advice = f"answer it with --model {stored['name']} --dtype {stored['dtype']}"
    raise UsageError(f"{path} was prefilled with another model: " + "; ".join(differences)
                     + f" ({advice})")


def read_state(model: "Model", path: str) -> tuple[Any, dict[str, Any]]:
    """(PrefillResult ready to answer on `model`, the file's JSON record) from the prefill
    file at `path`, the adapter resumed at the end of the video (see the module docstring).
    `Model.open` wraps it in a Session."""
    from safetensors import safe_open

    from statekv import accounting
    from statekv.cache import StateCache
    from statekv.models.base import PromptPieces
    from statekv.policies import make_policy
    from statekv.prefill import ANSWER_ROOM, PrefillResult, ensure_attention

    meta = read_metadata(path)
    check_model(meta, model, path)
    shape = meta["cache"]
    dtype = getattr(torch, str(shape["dtype"]), None)
    if dtype not in DTYPE_CODES:
        raise InputError(f"{path} holds a cache of unknown dtype {shape['dtype']}")
    layers = accounting.LMShape.from_model(model.adapter.language_model,
                                           model.adapter.text_config).layers
    if shape["layers"] != layers:
        raise UsageError(f"{path} holds {shape['layers']} layers; this model has {layers}")
    ensure_attention(model.adapter)
    cache = StateCache(make_policy("full"), layers, shape["capacity"], shape["attention"])
    tokens, capacity = shape["tokens"], max(shape["capacity"], shape["tokens"] + ANSWER_ROOM)
    expected = [shape["kv_heads"], tokens, shape["head_dim"]]
    device = model.device
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise InputError(f"{path} is damaged and cannot be read ({exc})") from None
    with handle:
        for index, layer in enumerate(cache.layers):
            planes = []
            for part in ("keys", "values"):
                name = f"layer.{index}.{part}"
                entry = meta["_index"].get(name)
                if entry is None or entry["shape"] != expected:
                    raise InputError(f"{path} is damaged: tensor {name} is missing or misshapen")
                tensor = handle.get_tensor(name)
                if hashlib.sha256(_host_bytes(tensor)).hexdigest() != meta["checksums"][name]:
                    raise InputError(f"{path} is corrupted: tensor {name} does not match its "
                                     f"checksum")
                buffer = torch.empty((1, shape["kv_heads"], capacity, shape["head_dim"]),
                                     dtype=dtype, device=device)
                buffer[0, :, :tokens] = tensor.to(device)
                planes.append(buffer)
                del tensor  # one layer of host memory at a time
            layer.keys, layer.values = planes
            layer.dtype, layer.device = dtype, device
            layer.is_initialized = True
            layer.seen = tokens
            layer.pinned = shape["pinned"]
            layer.max_carried = shape["max_carried"][index]
            layer.answering = True
    cache.video_tokens = shape["video_tokens"]
    prompt = PromptPieces(**meta["prompt"])
    result = meta["result"]
    plan = meta["plan"]
    state = PrefillResult(cache=cache, prompt=prompt, frames=result["frames"],
                          frame_timestamps=list(result["frame_timestamps"]),
                          chunk_tokens=list(result["chunk_tokens"]),
                          warnings=list(result["warnings"]), plan=plan,
                          adapter_state=meta["adapter_state"],
                          rotary_length=int(result.get("rotary_length", 0)))
    frame_size = tuple(plan["frame_size"]) if plan.get("frame_size") else None
    model.adapter.resume(plan["frame_count"], tuple(plan["timestamps"]), prompt,
                         frame_size=frame_size, duration=plan.get("duration"),
                         state=meta["adapter_state"])
    return state, meta
