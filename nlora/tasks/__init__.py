"""What a benchmark author touches: reading tasks of every kind, prompts, metrics, presets."""
