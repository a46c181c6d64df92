"""The OCI image layout on disk: a content-addressed store (umoci's cas.Engine contract)."""
