"""The HTTP surface: AWS JSON 1.1 on POST /, SigV4, validation from botocore's model."""
