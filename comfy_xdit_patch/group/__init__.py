"""The worker group as ComfyUI's process places and supervises it: Ray, placement, liveness (no torch at import)."""
