"""`make demo`: a built-in sample base image and tree, and the demo that runs the main
jobs on them."""
