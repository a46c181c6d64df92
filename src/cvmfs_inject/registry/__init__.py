"""The registry-direct client: the OCI distribution API over HTTP, and credentials."""
