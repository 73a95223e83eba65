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

################################################################################
# Jobs: termination hook, schedules, backup scale-out on queue depth (docs/jobs.md)
################################################################################

# A terminating instance (scale-in, rebalance) waits in Terminating:Wait until its agent has
# returned its job after the trainer's emergency checkpoint and completes the action (or the
# heartbeat runs out). Spot interruptions do not wait for hooks: the two-minute notice is all.
resource "aws_autoscaling_lifecycle_hook" "terminating" {
  name                   = "${local.name}-terminating"
  autoscaling_group_name = aws_autoscaling_group.training.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_TERMINATING"
  heartbeat_timeout      = var.termination_hook_heartbeat_seconds
  default_result         = "CONTINUE"
}

# -1 leaves a field as it is (the provider's default of 0 would empty the group).
resource "aws_autoscaling_schedule" "training" {
  for_each = { for s in var.schedules : s.name => s }

  scheduled_action_name  = "${local.name}-${each.key}"
  autoscaling_group_name = aws_autoscaling_group.training.name
  recurrence             = each.value.recurrence
  time_zone              = each.value.time_zone
  min_size               = each.value.min_size
  max_size               = each.value.max_size
  desired_capacity       = each.value.desired_capacity
}

# The reconciler sets desired capacity itself; this policy is the backup that starts one instance
# when jobs wait and nothing reconciles (a fleet at zero runs no reconciler timer).
resource "aws_autoscaling_policy" "queue_backlog" {
  name                   = "${local.name}-queue-backlog"
  autoscaling_group_name = aws_autoscaling_group.training.name
  policy_type            = "StepScaling"
  adjustment_type        = "ChangeInCapacity"

  step_adjustment {
    metric_interval_lower_bound = 0
    scaling_adjustment          = 1
  }
}
