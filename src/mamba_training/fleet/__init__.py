"""The fleet: jobs in an S3 jobs store and an SQS queue, the agent that runs them on each
instance, the reconciler that sizes the auto scaling group (and, from the multi-node work, the
launcher and coordinator). It runs trainers as processes and never calls into the training loop."""
