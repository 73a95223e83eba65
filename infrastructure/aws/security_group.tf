################################################################################
# Security group: inbound only from peers of the fleet (and SSH from the given CIDRs)
################################################################################

locals {
  # Any /0 block (0.0.0.0/0, ::/0) is "the whole internet".
  public_ssh_cidrs = [for c in var.allowed_ssh_cidrs : c if endswith(c, "/0")]
  ssh_cidrs_v4     = [for c in var.allowed_ssh_cidrs : c if !strcontains(c, ":")]
  ssh_cidrs_v6     = [for c in var.allowed_ssh_cidrs : c if strcontains(c, ":")]
}

resource "aws_security_group" "instances" {
  name_prefix = "${local.name}-training-"
  description = "Training instances of ${local.name}"
  vpc_id      = data.aws_vpc.selected.id

  tags = {
    Name = "${local.name}-training"
  }

  lifecycle {
    create_before_destroy = true

    precondition {
      condition     = var.allow_public_ssh || length(local.public_ssh_cidrs) == 0
      error_message = "The allowed_ssh_cidrs opens SSH to the whole internet (0.0.0.0/0 or ::/0); set allow_public_ssh = true if you really mean it."
    }
  }
}

resource "aws_vpc_security_group_ingress_rule" "ssh_v4" {
  #checkov:skip=CKV_AWS_24:SSH from 0.0.0.0/0 is only possible with the explicit allow_public_ssh opt-in (precondition above).
  for_each = toset(local.ssh_cidrs_v4)

  security_group_id = aws_security_group.instances.id
  description       = "SSH from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "ssh_v6" {
  #checkov:skip=CKV_AWS_24:SSH from ::/0 is only possible with the explicit allow_public_ssh opt-in (precondition above).
  for_each = toset(local.ssh_cidrs_v6)

  security_group_id = aws_security_group.instances.id
  description       = "SSH from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv6         = each.value
}

# Peers of one run exchange rendezvous and collective traffic (the process group's store on
# rank 0, gloo/NCCL sockets on ephemeral ports) with each other and with nobody else.
resource "aws_vpc_security_group_ingress_rule" "training_peers" {
  security_group_id            = aws_security_group.instances.id
  description                  = "Rendezvous and collectives between training instances"
  ip_protocol                  = "-1"
  referenced_security_group_id = aws_security_group.instances.id
}

resource "aws_vpc_security_group_egress_rule" "all" {
  #checkov:skip=CKV_AWS_382:Instances reach PyPI, GitHub, S3, CloudWatch and the SSM endpoints; a proxy or VPC endpoints would be needed to narrow egress.
  security_group_id = aws_security_group.instances.id
  description       = "Package downloads, AWS APIs, Session Manager"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}
