"""A rank's own code: the Ray actor, the model it builds, its share of each call, attention, compiled blocks."""
