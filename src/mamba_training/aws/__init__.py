"""Everything that talks to AWS. The only package that creates boto3 clients (see session.py)."""
