"""The embedded demo MoE: a tiny Mixtral-architecture model, its byte tokenizer and its training loop."""
