"""OCI and Docker image documents: media types, digests, descriptors, the walk and the
schemas. Pure: nothing here reads or writes an image store."""
