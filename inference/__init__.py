"""Generation and chat on top of actors saved by the training steps."""
