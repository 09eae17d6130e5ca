"""Model construction (hub name, local directory or tiny in-repo config) and Hugging Face save/load."""
