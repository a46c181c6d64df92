"""One module per user-visible operation; each is one function over the image model."""
