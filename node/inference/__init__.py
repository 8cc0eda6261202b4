"""Model bundles and batched inference."""
