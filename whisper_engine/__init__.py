"""The model and its accelerator runtime: weights, tokenizer, mel, encoder, cached decoder, backends."""
