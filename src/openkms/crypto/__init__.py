"""All cryptography of openkms. The only package that imports cryptography.hazmat."""
