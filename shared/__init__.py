"""What both sides need: study configuration, message codec, privacy rules, shared statistics."""
