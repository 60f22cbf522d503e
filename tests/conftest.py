"""Test-wide setup: CPU runs use Triton's interpreter; GPU-only tests skip without CUDA."""

import os
import tempfile

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any kernel module is
# imported. On a machine without CUDA the interpreter is the only way Triton kernels run at all.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Caches (model fingerprints) go to a throwaway folder, not the user's home.
os.environ.setdefault("MOSAIC_EMBED_CACHE", tempfile.mkdtemp(prefix="mosaic-embed-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
