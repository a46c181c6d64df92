"""`batch`: one tree into many images, packed once, each blob uploaded once per registry."""

# images at once at most: each holds a thread, a connection pool and perhaps a skopeo process
MAX_JOBS = 64
