"""Short digests that tell whether two runs (or a run and a teacher cache) used the same models, data and processor."""

import hashlib
import io
import json

import torch

from .models import unwrap_peft

# Config entries that change between saves of the same model and say nothing about what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation")
# Elements hashed per parameter: enough to tell fine-tuned weights apart without reading a 7B model end to end.
_SAMPLED_ELEMENTS = 4096


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module, with_name: bool = True, with_weights: bool = False) -> dict:
    """Class, config digest (without volatile keys), optionally name and a sampled digest of the weights."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    entry = {"class": type(base).__name__}
    if config is not None:
        values = config.to_dict()
        for volatile in _VOLATILE_CONFIG_KEYS:
            values.pop(volatile, None)
        entry["config_sha256"] = _sha(json.dumps(values, sort_keys=True, default=str))
        if with_name and getattr(config, "_name_or_path", ""):
            entry["name_or_path"] = config._name_or_path
    if with_weights:
        entry["weights_sha256"] = weights_digest(base)
    return entry


def weights_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter's name, shape and evenly spaced sample of its values (in float32)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if not isinstance(param, torch.Tensor) or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLED_ELEMENTS)
            sample = flat[::step][:_SAMPLED_ELEMENTS].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(param.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class _HashSink(io.RawIOBase):
    def __init__(self):
        self.digest = hashlib.sha256()

    def writable(self):
        return True

    def write(self, data):
        self.digest.update(data)
        return len(data)


def dataset_fingerprint(dataset) -> str:
    """Digest of a `datasets.Dataset`'s visible rows: the bytes of every column, row order included.

    Computed from the data, not from `Dataset._fingerprint`, which changes when a `.map` function cannot be hashed.
    Reads the memory-mapped table once (about a second per GB).
    """
    import pyarrow as pa

    sink = _HashSink()
    arrow = dataset.with_format("arrow")
    writer = None
    for start in range(0, len(arrow), 10_000):
        # The schema's metadata carries `datasets`' own fingerprint (its map history): dropped, so that equal rows
        # give equal digests however they were made.
        table = arrow[start : start + 10_000].replace_schema_metadata(None)
        if writer is None:
            writer = pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema)
        # The IPC stream writes sliced arrays compactly, so equal rows give equal bytes however they are stored.
        writer.write_table(table.combine_chunks())
    if writer is not None:
        writer.close()
    return f"{len(dataset)}:{sink.digest.hexdigest()[:16]}"


def processor_fingerprint(processor) -> str | None:
    """Digest of a tokenizer's vocabulary and special tokens, or an image processor's settings."""
    if processor is None:
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        special = getattr(tokenizer, "all_special_tokens", [])
        padding = getattr(tokenizer, "padding_side", None)
        return _sha(json.dumps([sorted(get_vocab().items()), special, padding], default=str))
    to_json = getattr(processor, "to_json_string", None)
    if callable(to_json):
        values = json.loads(to_json())
        values.pop("processor_class", None)
        return _sha(json.dumps(values, sort_keys=True, default=str))
    return None
