"""Where data lives: local paths and object-store URLs, durable writes."""
