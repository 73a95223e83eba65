"""Custom checkov policies for this stack (loaded with --external-checks-dir)."""
