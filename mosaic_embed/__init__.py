"""mosaic_embed: pretrain a MosaicBERT encoder on your own text; finetune it into classifiers and embedders.

``import mosaic_embed`` makes transformers' Auto classes know ``model_type="mosaic_bert"``, so
``AutoModel.from_pretrained(dir)`` and ``SentenceTransformer(dir)`` load our checkpoints without
``trust_remote_code``.

It does so without importing torch or transformers itself (seconds of start-up that the command line's
``--help`` must not pay), and in two steps, each when transformers first imports the Auto module it extends
(a post-import hook, the pattern of PEP 369 / ``wrapt.when_imported``), or at once when that module is already
imported: ``AutoConfig`` (and so ``AutoTokenizer``) learns the configuration, ``AutoModel*`` the models. The
Encoder needs only the first: it runs saved backbones without importing transformers' ``modeling_utils``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register_config() -> None:
    from .model import register_config

    register_config()


def _register_models() -> None:
    from .model import register_models

    register_models()


# transformers module -> what to register right after it has run
_AFTER_IMPORT = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_models,
}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when one of ``_AFTER_IMPORT``'s modules is about to be imported it wraps the real
    loader so that the registration runs right after the module's own code; removes itself when all ran."""

    def __init__(self, pending: set[str]):
        self.pending, self.active = pending, False

    def find_spec(self, name, path=None, target=None):
        hook = _AFTER_IMPORT.get(name)
        if hook is None or self.active:  # active: our own lookup of the real spec below
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        try:
            self.active = True
            spec = importlib.util.find_spec(name)
        finally:
            self.active = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            hook()

        spec.loader.exec_module = exec_then_register
        return spec


def _install() -> None:
    pending = set()
    for name, hook in _AFTER_IMPORT.items():
        if name in sys.modules:
            hook()
        else:
            pending.add(name)
    if pending and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(pending))


_install()
