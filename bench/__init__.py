"""Load generators and comparisons against peer servers (run as scripts, never as timed tests)."""
