"""The ``mosaic-embed`` command: one thin click command per pipeline stage.

Each command parses options, loads its recipe (``--recipe`` name or path, ``--set key=value``
overrides) and calls the plain Python function of its stage; no logic lives here.
"""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .config import ConfigError


def recipe_options(func):
    """``--recipe NAME|PATH`` and repeatable ``--set dotted.key=value`` for a stage's config."""

    @click.option("--recipe", "recipe", default=None, help="Recipe name under recipes/<stage>/ or a YAML path.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (dotted).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


class _Group(click.Group):
    """Turns the project's expected errors (bad config, bad input files) into one clear line and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            if isinstance(err, click.ClickException):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mosaic-embed")
def main() -> None:
    """Pretrain a MosaicBERT encoder on your corpus; finetune it for GLUE-style tasks and embeddings."""


# ---- data: corpus -> tokenizer -> shards -----------------------------------------------------------------


@main.group()
def data() -> None:
    """Read a corpus and turn it into token shards."""


@main.group()
def tokenizer() -> None:
    """Train or inspect WordPiece tokenizers."""


if __name__ == "__main__":
    main()
