"""The fleet: jobs in an S3 jobs store and an SQS queue, the agent that runs them on each
instance, the reconciler that sizes the auto scaling group, and the multi-node launcher and
coordinator (docs/design.md, "Multi-node training"). It runs trainers as processes and never
calls into the training loop."""
