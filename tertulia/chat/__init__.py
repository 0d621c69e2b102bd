"""Chat layer: conversations, personas, and fitting history into a model's context."""
