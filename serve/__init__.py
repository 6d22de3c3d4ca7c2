"""The HTTP inference service (a leaf): ``python -m serve --model MODEL``; see its ``--help``."""
