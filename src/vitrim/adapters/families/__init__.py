"""One module per model family; each registers a :class:`vitrim.adapters.registry.Family` at import."""
