"""Training loops for heads, drafts and SkipDecode fine-tuning."""
