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

  # GPUs per instance type: every node of a run starts one trainer per GPU, and torchrun needs
  # the same number on every node, so a run's instance types must agree (variables.tf checks).
  gpus_per_instance_type = {
    "g4dn.xlarge"   = 1, "g4dn.2xlarge" = 1, "g4dn.4xlarge" = 1, "g4dn.8xlarge" = 1, "g4dn.16xlarge" = 1,
    "g4dn.12xlarge" = 4, "g4dn.metal" = 8,
    "g5.xlarge"     = 1, "g5.2xlarge" = 1, "g5.4xlarge" = 1, "g5.8xlarge" = 1, "g5.16xlarge" = 1,
    "g5.12xlarge"   = 4, "g5.24xlarge" = 4, "g5.48xlarge" = 8,
    "g6.xlarge"     = 1, "g6.2xlarge" = 1, "g6.4xlarge" = 1, "g6.8xlarge" = 1, "g6.16xlarge" = 1,
    "g6.12xlarge"   = 4, "g6.24xlarge" = 4, "g6.48xlarge" = 8,
    "g6e.xlarge"    = 1, "g6e.2xlarge" = 1, "g6e.4xlarge" = 1, "g6e.8xlarge" = 1, "g6e.16xlarge" = 1,
    "g6e.12xlarge"  = 4, "g6e.24xlarge" = 4, "g6e.48xlarge" = 8,
    "p3.2xlarge"    = 1, "p3.8xlarge" = 4, "p3.16xlarge" = 8,
    "p4d.24xlarge"  = 8, "p4de.24xlarge" = 8, "p5.48xlarge" = 8, "p5e.48xlarge" = 8, "p5en.48xlarge" = 8,
  }
  gpus_per_node = local.gpus_per_instance_type[var.instance_types[0]]
  nnodes        = "${var.min_nodes_per_run}:${var.max_nodes_per_run}"
}
