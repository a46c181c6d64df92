"""The packer (directory -> reproducible tar -> diff_id -> compressed blob) and extraction."""
