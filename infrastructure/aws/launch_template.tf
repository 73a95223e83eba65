################################################################################
# Launch template: Deep Learning AMI, IMDSv2 only, encrypted gp3, bootstrap user data
################################################################################

# The Deep Learning AMI is published as a public SSM parameter; read it unless an AMI is given.
data "aws_ssm_parameter" "dlami" {
  count = var.ami_id == null ? 1 : 0

  name = coalesce(var.ami_ssm_parameter_name, "/aws/service/deeplearning/ami/x86_64/${var.dlami_type}/latest/ami-id")
}

locals {
  ami_id = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.dlami[0].value)

  app_dir   = "/opt/mamba-training"
  log_dir   = "/var/log/mamba-training"
  setup_log = "/var/log/mamba-training-setup.log"

  # Read by the systemd unit (EnvironmentFile) and by check_status.sh.
  instance_env = join("\n", [
    "AWS_REGION=${var.region}",
    "AWS_DEFAULT_REGION=${var.region}",
    "MAMBA_RUN_STORE=${local.run_store}",
    "MAMBA_QUEUE_URL=${aws_sqs_queue.jobs.url}",
    "MAMBA_JOBS_STORE=s3://${aws_s3_bucket.checkpoints.id}/${var.jobs_prefix}",
    "MAMBA_ASG_NAME=${local.asg_name}",
    "MAMBA_COORDINATOR=${local.coordinator_endpoint}",
    "MAMBA_NNODES=${local.nnodes}",
    "MAMBA_LOG_DIR=${local.log_dir}",
    "MAMBA_VENV=${local.app_dir}/venv",
    "PYTHONUNBUFFERED=1",
  ])

  service_unit = templatefile("${path.module}/files/mamba-training.service.tftpl", {
    name                 = local.name
    user                 = "mamba"
    app_dir              = local.app_dir
    log_dir              = local.log_dir
    stop_timeout_seconds = local.stop_timeout_seconds
    idle_seconds         = var.agent_idle_seconds
    lease_seconds        = var.agent_lease_seconds
  })

  reconcile_service = templatefile("${path.module}/files/mamba-reconcile.service.tftpl", {
    name    = local.name
    user    = "mamba"
    app_dir = local.app_dir
    log_dir = local.log_dir
  })
  reconcile_timer = templatefile("${path.module}/files/mamba-reconcile.timer.tftpl", {
    name             = local.name
    interval_seconds = var.reconcile_interval_seconds
  })

  cloudwatch_agent_json = templatefile("${path.module}/files/cloudwatch-agent.json.tftpl", {
    log_dir        = local.log_dir
    setup_log      = local.setup_log
    log_group_name = aws_cloudwatch_log_group.training.name
  })

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    name                  = local.name
    region                = var.region
    user                  = "mamba"
    app_dir               = local.app_dir
    log_dir               = local.log_dir
    setup_log             = local.setup_log
    env_file              = local.instance_env
    config_yaml           = chomp(yamlencode(local.training_config))
    start_training_sh     = chomp(file("${path.module}/files/start_training.sh"))
    check_status_sh       = chomp(file("${path.module}/files/check_status.sh"))
    service_unit          = chomp(local.service_unit)
    reconcile_service     = chomp(local.reconcile_service)
    reconcile_timer       = chomp(local.reconcile_timer)
    cloudwatch_agent_json = local.cloudwatch_agent_json
    torch_version         = var.torch_version
    package_source        = local.package_source
  })
}

resource "aws_launch_template" "training" {
  #checkov:skip=CKV_AWS_88:A default VPC has no NAT; instances need a public IP to reach PyPI and AWS APIs (set associate_public_ip_address = false in private subnets with NAT). No inbound rule exists unless allowed_ssh_cidrs is set.
  #checkov:skip=CKV_AWS_341:Hop limit 2 (var.imds_hop_limit) lets containers on the instance reach IMDSv2 for spot notices; tokens are still required.
  name_prefix            = "${local.name}-training-"
  description            = "GPU training instances of ${local.name}"
  image_id               = local.ami_id
  instance_type          = var.instance_types[0]
  key_name               = var.key_pair_name
  update_default_version = true
  user_data              = base64encode(local.user_data)
  ebs_optimized          = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.imds_hop_limit
    instance_metadata_tags      = "enabled"
  }

  block_device_mappings {
    device_name = "/dev/sda1"

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size
      encrypted             = true
      kms_key_id            = var.kms_key_arn
      delete_on_termination = true
    }
  }

  network_interfaces {
    associate_public_ip_address = var.associate_public_ip_address
    security_groups             = [aws_security_group.instances.id]
    delete_on_termination       = true
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${local.name}-training" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${local.name}-training" })
  }

  lifecycle {
    precondition {
      condition     = var.ami_id != null || length(setintersection(local.instance_families, local.dlami_unsupported_families)) == 0
      error_message = "The instance_types include ${join(", ", setintersection(local.instance_families, local.dlami_unsupported_families))}, which current Deep Learning AMIs do not support; choose G4dn/G5/G6/G6e/P4/P5 types or set ami_id."
    }

    precondition {
      condition     = length(local.user_data) <= 16384
      error_message = "The rendered user data is ${length(local.user_data)} bytes; EC2 accepts at most 16384."
    }
  }
}
