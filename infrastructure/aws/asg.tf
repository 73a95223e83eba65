################################################################################
# Auto scaling group: spot first, several instance types, capacity rebalance
################################################################################

resource "aws_autoscaling_group" "training" {
  name                = local.asg_name
  min_size            = var.min_instances
  max_size            = var.max_instances
  desired_capacity    = var.desired_instances
  vpc_zone_identifier = local.subnet_ids
  capacity_rebalance  = true
  # Spot capacity can take long to appear; Terraform must not wait for instances.
  wait_for_capacity_timeout = "0"
  health_check_type         = "EC2"
  health_check_grace_period = 600
  # Preempted instances are replaced, never refreshed: an instance refresh would kill running jobs.
  default_instance_warmup = 600

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = var.on_demand_base_capacity
      on_demand_percentage_above_base_capacity = var.on_demand_percentage_above_base
      spot_allocation_strategy                 = var.spot_allocation_strategy
      spot_max_price                           = var.max_spot_price == null ? "" : tostring(var.max_spot_price)
    }

    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.training.id
        version            = "$Latest"
      }

      dynamic "override" {
        for_each = var.instance_types

        content {
          instance_type = override.value
        }
      }
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${local.name}-training" })

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    precondition {
      condition     = var.desired_instances <= var.max_instances
      error_message = "The desired_instances (${var.desired_instances}) must not exceed max_instances (${var.max_instances})."
    }

    precondition {
      condition     = var.min_instances <= var.desired_instances
      error_message = "The min_instances (${var.min_instances}) must not exceed desired_instances (${var.desired_instances})."
    }

    precondition {
      condition     = var.on_demand_base_capacity <= var.max_instances
      error_message = "The on_demand_base_capacity (${var.on_demand_base_capacity}) must not exceed max_instances (${var.max_instances})."
    }
  }
}
