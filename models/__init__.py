"""The ground floor: model descriptions, registry, charset and CTC, checkpoints, weights,
networks, DB post-processing and one owner per model file format."""
