"""Where key material lives and where cryptography with it runs."""
