"""Small causal LMs pretrained from scratch on open text (``atoll pretrain``): corpus, tokenizer,
training loop with exact resume, evaluation and model cards."""
