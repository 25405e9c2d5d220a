"""Load a model and tokenizer for collection: the embedded demo MoE, a local folder or a cached hub name."""

from __future__ import annotations

import os
from pathlib import Path

from finemoe.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def dtype_kwarg(dtype) -> dict:
    """transformers 5 calls it `dtype`, 4.x `torch_dtype`."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available")
    return device


def load_model(name_or_path: str | None, *, dtype: str = "auto", device: str = "cpu"):
    """(model, tokenizer, name) on `device`. None means the demo model shipped inside the package."""
    model, tok, name = _load(name_or_path, dtype=dtype)
    return model.to(resolve_device(device)), tok, name


def _load(name_or_path: str | None, *, dtype: str):
    import torch

    from finemoe.demo_model.model import DEMO_MODEL_NAME, demo_model_dir, load_demo_model
    from finemoe.demo_model.tokenizer import ByteTokenizer
    from finemoe.traces.collect.adapters import architecture_of

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name_or_path is None:
        model, tok = load_demo_model(demo_model_dir())
        return model, tok, DEMO_MODEL_NAME
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(name_or_path)
    if not path.exists() and (name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1):
        raise ConfigError(f"{name_or_path}: no such model folder")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load model config {name_or_path!r} (offline: only local folders and models already "
            f"in the Hugging Face cache work): {str(exc).splitlines()[0]}"
        ) from None
    architecture_of(config)  # an unsupported architecture fails before any weight is read
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **dtype_kwarg(torch_dtype))
    model.eval()
    if path.is_dir() and ByteTokenizer.is_saved_in(path):
        tok = ByteTokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    name = path.name if path.is_dir() else name_or_path
    return model, tok, name
