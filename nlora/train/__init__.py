"""The training engine: the loop, checkpoints, in-forward penalties, gradient masks. A method plugs in through nlora.methods and never edits these."""
