"""What both processes import: the messages, the model spec, the call layout, the per-step channel."""
