"""Search over saved embeddings: ranking by text or image, and near-duplicate groups."""
