"""Small helpers shared by every layer: graph accessors, config instantiation, errors."""
