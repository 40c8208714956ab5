"""optipipe core: recipes, the artifact store, model handles, data, evaluation and the CLI."""

__version__ = "0.1.0"
