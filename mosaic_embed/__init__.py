"""mosaic_embed: pretrain a MosaicBERT encoder on your own text; finetune it into classifiers and embedders.

``import mosaic_embed`` makes transformers' Auto classes know ``model_type="mosaic_bert"``, so
``AutoModel.from_pretrained(dir)`` and ``SentenceTransformer(dir)`` load our checkpoints without
``trust_remote_code``.

It does so without importing torch or transformers itself (seconds of start-up that the command line's
``--help`` must not pay): if transformers is already imported the registration happens at once, otherwise
when transformers is first imported (a post-import hook, the pattern of PEP 369 / ``wrapt.when_imported``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from . import model  # noqa: F401  (model/__init__ registers the Auto classes)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``transformers`` is about to be imported it wraps the real loader so that
    the registration runs right after transformers' own module code, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
