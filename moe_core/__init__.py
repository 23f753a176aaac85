"""Framework-free core of upmoe: model, checkpoint I/O, tokenizer and the embedded corpus."""
