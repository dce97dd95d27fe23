"""domain/scheduling."""
