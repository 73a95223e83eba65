locals {
  name = "${var.project}-${var.environment}"

  tags = merge(var.tags, {
    Project     = var.project
    Environment = var.environment
    ManagedBy   = "terraform"
  })

  asg_name       = "${local.name}-training-asg"
  log_group_name = "/aws/ec2/${local.name}/training"

  package_source = coalesce(var.package_source, "git+${var.package_repository}@${var.package_ref}")
  run_store      = "s3://${aws_s3_bucket.checkpoints.id}/${var.run_prefix}/${var.run_name}"

  # The service must outlive the emergency checkpoint: SIGTERM, grace, then a margin for upload/exit.
  stop_timeout_seconds = var.checkpoint_grace_seconds + 30

  # The user's run config, with the keys the stack owns forced: where checkpoints go, spot watching,
  # and the AWS identity that tags metrics and logs.
  training_config = merge(var.training_config, {
    checkpoint = merge(try(var.training_config.checkpoint, {}), {
      store = local.run_store
    })
    spot = merge(try(var.training_config.spot, {}), {
      imds_url      = "auto"
      grace_seconds = var.checkpoint_grace_seconds
    })
    aws = merge(try(var.training_config.aws, {}), {
      project           = var.project
      environment       = var.environment
      region            = var.region
      metrics_namespace = var.metrics_namespace
    })
    logging = merge(try(var.training_config.logging, {}), {
      cloudwatch = "on"
    })
  })

  # Families the current Deep Learning AMIs no longer support (their drivers dropped them).
  dlami_unsupported_families = ["p2", "p3", "g3", "g4ad"]
  instance_families          = [for t in var.instance_types : split(".", t)[0]]
}
