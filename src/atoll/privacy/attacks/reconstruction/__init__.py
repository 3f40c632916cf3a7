"""Reconstruction of a client's training text from its LoRA gradient or update (server-side,
honest-but-curious: the server knows the model it sent and sees one client's upload)."""
