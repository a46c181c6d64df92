"""The image model: references, sources, sinks, pure edits and the bottom-up commit."""
