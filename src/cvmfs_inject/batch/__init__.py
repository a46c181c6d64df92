"""`batch`: one tree into many images, packed once, each blob uploaded once per registry."""
