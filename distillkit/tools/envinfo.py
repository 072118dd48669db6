"""`distillkit env`: what is installed, what was built, which backends run here."""

from __future__ import annotations

import argparse
import os
import platform
from importlib import metadata

import torch

from .. import __version__
from ..core import backends


# The libraries distillkit plugs into (drop-ins, trainer, data) and reads from: their installed versions.
INTEGRATIONS = ("transformers", "accelerate", "datasets", "tokenizers", "safetensors", "trl", "torchtune",
                "liger-kernel", "peft", "deepspeed")


def integration_versions() -> dict[str, str]:
    """Installed version of each of INTEGRATIONS, from package metadata (nothing is imported)."""
    out = {}
    for name in INTEGRATIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def collect() -> dict:
    info = {
        "distillkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "cuda devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        from ..core.backends import _ext

        info["extension"] = _ext.describe() if hasattr(_ext, "describe") else (
            "built" if _ext.available() else "not built")
    except ImportError as e:
        info["extension"] = f"not available ({e})"
    info["integrations"] = integration_versions()
    usable = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        names = []
        for name in backends.REGISTRY:
            try:
                backends.resolve(name, torch.device(device), torch.float32)
                names.append(name)
            except ValueError:
                pass
        usable[device] = {"auto": backends.resolve("auto", torch.device(device), torch.float32), "available": names}
    info["backends"] = usable
    return info


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="distillkit env", description=__doc__).parse_args(argv)
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
