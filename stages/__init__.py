"""optipipe stages, one module each; the registry (pipeline.run.registry) discovers them."""
