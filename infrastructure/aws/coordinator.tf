################################################################################
# Coordinator: the rendezvous store the training nodes meet at. A small on-demand
# instance in an auto scaling group of 1, reachable at a fixed private address:
# a network interface that outlives the instance and that each new coordinator
# instance attaches at boot. It holds no training state: losing it costs a run at
# most a restart from its last committed checkpoint (docs/design.md).
################################################################################

locals {
  # The interface lives in one subnet (one availability zone); the group launches there only.
  coordinator_subnet_id = local.subnet_ids[0]
  coordinator_endpoint  = "${aws_network_interface.coordinator.private_ip}:${var.coordinator_port}"

  coordinator_user_data = templatefile("${path.module}/templates/coordinator_user_data.sh.tftpl", {
    name                 = local.name
    region               = var.region
    app_dir              = local.app_dir
    network_interface_id = aws_network_interface.coordinator.id
    port                 = var.coordinator_port
    torch_version        = var.torch_version
    package_source       = local.package_source
  })
}

resource "aws_security_group" "coordinator" {
  name_prefix = "${local.name}-coordinator-"
  description = "Rendezvous coordinator of ${local.name}"
  vpc_id      = data.aws_vpc.selected.id

  tags = {
    Name = "${local.name}-coordinator"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "coordinator_from_training" {
  security_group_id            = aws_security_group.coordinator.id
  description                  = "Rendezvous from the training instances"
  ip_protocol                  = "tcp"
  from_port                    = var.coordinator_port
  to_port                      = var.coordinator_port
  referenced_security_group_id = aws_security_group.instances.id
}

resource "aws_vpc_security_group_egress_rule" "coordinator_all" {
  #checkov:skip=CKV_AWS_382:The coordinator installs its package from PyPI/GitHub and calls the EC2 API to attach its interface.
  security_group_id = aws_security_group.coordinator.id
  description       = "Package downloads, EC2 API"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_network_interface" "coordinator" {
  description     = "Fixed address of the ${local.name} coordinator"
  subnet_id       = local.coordinator_subnet_id
  security_groups = [aws_security_group.coordinator.id]

  tags = {
    Name = "${local.name}-coordinator"
  }
}

data "aws_iam_policy_document" "coordinator" {
  #checkov:skip=CKV_AWS_356:ec2:DescribeNetworkInterfaces has no resource-level permissions.
  statement {
    sid       = "AttachOwnInterface"
    actions   = ["ec2:AttachNetworkInterface"]
    resources = [aws_network_interface.coordinator.arn, "arn:aws:ec2:${var.region}:*:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/Project"
      values   = [var.project]
    }
  }

  statement {
    sid       = "DescribeInterfaces"
    actions   = ["ec2:DescribeNetworkInterfaces"]
    resources = ["*"]
  }
}

resource "aws_iam_role" "coordinator" {
  name_prefix        = "${local.name}-coordinator-"
  description        = "Rendezvous coordinator of ${local.name}"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_role_policy" "coordinator" {
  name   = "${local.name}-coordinator"
  role   = aws_iam_role.coordinator.id
  policy = data.aws_iam_policy_document.coordinator.json
}

resource "aws_iam_instance_profile" "coordinator" {
  name_prefix = "${local.name}-coordinator-"
  role        = aws_iam_role.coordinator.name
}

resource "aws_launch_template" "coordinator" {
  #checkov:skip=CKV_AWS_88:Like the training instances, the coordinator reaches PyPI through a public IP in a default VPC; its only inbound rule is the rendezvous port from the training security group.
  name_prefix            = "${local.name}-coordinator-"
  description            = "Rendezvous coordinator of ${local.name}"
  image_id               = local.ami_id
  instance_type          = var.coordinator_instance_type
  update_default_version = true
  user_data              = base64encode(local.coordinator_user_data)
  ebs_optimized          = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.coordinator.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
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
    security_groups             = [aws_security_group.coordinator.id]
    delete_on_termination       = true
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${local.name}-coordinator" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${local.name}-coordinator" })
  }
}

resource "aws_autoscaling_group" "coordinator" {
  name                      = "${local.name}-coordinator-asg"
  min_size                  = 1
  max_size                  = 1
  desired_capacity          = 1
  vpc_zone_identifier       = [local.coordinator_subnet_id]
  wait_for_capacity_timeout = "0"
  health_check_type         = "EC2"
  health_check_grace_period = 300

  launch_template {
    id      = aws_launch_template.coordinator.id
    version = "$Latest"
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${local.name}-coordinator" })

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
