"""Client-side helpers. Imports nothing from the server packages."""
