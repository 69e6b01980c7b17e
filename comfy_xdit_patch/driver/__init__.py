"""ComfyUI's process: the wrappers that route FLUX calls, the early start, the status document (docs/design.md)."""
