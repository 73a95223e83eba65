# Plan-time checks with a mocked provider (offline): `terraform test` in infrastructure/aws.
# Every bad input must stop the plan at the variable or resource that names it.

mock_provider "aws" {
  # The coordinator's fixed address is in every instance's env file: known at plan here.
  mock_resource "aws_network_interface" {
    override_during = plan
    defaults = {
      private_ip = "10.0.0.5"
    }
  }

  mock_data "aws_iam_policy_document" {
    defaults = {
      json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}"
    }
  }

  mock_data "aws_ssm_parameter" {
    defaults = {
      value = "ami-0123456789abcdef0"
    }
  }

  mock_data "aws_subnets" {
    defaults = {
      ids = ["subnet-0123456789abcdef0"]
    }
  }
}

variables {
  environment = "dev"
}

run "defaults_plan" {
  command = plan

  assert {
    condition     = aws_autoscaling_group.training.name == "mamba-training-dev-training-asg"
    error_message = "The group must be named <project>-<environment>-training-asg."
  }

  assert {
    condition     = aws_cloudwatch_log_group.training.name == "/aws/ec2/mamba-training-dev/training"
    error_message = "The log group must be /aws/ec2/<project>-<environment>/training."
  }

  assert {
    condition     = aws_launch_template.training.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 must be required."
  }

  assert {
    condition     = aws_launch_template.training.image_id == "ami-0123456789abcdef0"
    error_message = "Without ami_id the AMI comes from the Deep Learning AMI SSM parameter."
  }

  assert {
    condition     = data.aws_ssm_parameter.dlami[0].name == "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    error_message = "The default AMI parameter is the Deep Learning AMI's public parameter."
  }

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.ssh_v4) == 0 && length(aws_vpc_security_group_ingress_rule.ssh_v6) == 0
    error_message = "No inbound rule by default."
  }

  assert {
    condition     = [for r in aws_s3_bucket_lifecycle_configuration.checkpoints.rule : r.noncurrent_version_expiration[0].noncurrent_days if r.id == "expire-noncurrent-versions"] == [1]
    error_message = "By default, pruned checkpoints (noncurrent versions) must expire after 1 day."
  }
}

run "longer_noncurrent_window_on_request" {
  command = plan

  variables {
    noncurrent_version_expiration_days = 30
  }

  assert {
    condition     = [for r in aws_s3_bucket_lifecycle_configuration.checkpoints.rule : r.noncurrent_version_expiration[0].noncurrent_days if r.id == "expire-noncurrent-versions"] == [30]
    error_message = "noncurrent_version_expiration_days must set the noncurrent-version lifecycle rule."
  }
}

run "public_ssh_needs_opt_in" {
  command = plan

  variables {
    allowed_ssh_cidrs = ["0.0.0.0/0"]
  }

  expect_failures = [aws_security_group.instances]
}

run "public_ssh_with_opt_in" {
  command = plan

  variables {
    allowed_ssh_cidrs = ["0.0.0.0/0", "203.0.113.0/24"]
    allow_public_ssh  = true
  }

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.ssh_v4) == 2
    error_message = "With the opt-in both SSH rules exist."
  }
}

run "max_below_desired" {
  command = plan

  variables {
    max_instances     = 1
    desired_instances = 2
  }

  expect_failures = [aws_autoscaling_group.training]
}

run "bad_instance_type_format" {
  command = plan

  variables {
    instance_types = ["g4dn-xlarge"]
  }

  expect_failures = [var.instance_types]
}

run "empty_instance_list" {
  command = plan

  variables {
    instance_types = []
  }

  expect_failures = [var.instance_types]
}

run "negative_price" {
  command = plan

  variables {
    max_spot_price = -0.5
  }

  expect_failures = [var.max_spot_price]
}

run "p3_needs_own_ami" {
  command = plan

  variables {
    instance_types = ["g4dn.2xlarge", "p3.2xlarge"]
  }

  expect_failures = [aws_launch_template.training]
}

run "noncurrent_days_zero" {
  command = plan

  variables {
    noncurrent_version_expiration_days = 0
  }

  expect_failures = [var.noncurrent_version_expiration_days]
}

run "noncurrent_days_fraction" {
  command = plan

  variables {
    noncurrent_version_expiration_days = 0.5
  }

  expect_failures = [var.noncurrent_version_expiration_days]
}

run "weekend_schedule_keeps_unset_fields" {
  command = plan

  variables {
    schedules = [
      { name = "weekend-off", recurrence = "0 0 * * 6", min_size = 0, max_size = 0, desired_capacity = 0 },
      { name = "weekday-on", recurrence = "0 6 * * 1", max_size = 4 },
    ]
  }

  assert {
    condition     = aws_autoscaling_schedule.training["weekday-on"].min_size == -1 && aws_autoscaling_schedule.training["weekday-on"].desired_capacity == -1
    error_message = "Fields a schedule leaves out must be -1 (unchanged), not 0."
  }

  assert {
    condition     = aws_autoscaling_schedule.training["weekend-off"].max_size == 0
    error_message = "The weekend schedule empties the group."
  }

  assert {
    condition     = aws_autoscaling_lifecycle_hook.terminating.lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
    error_message = "A termination lifecycle hook must exist."
  }
}

run "schedule_with_bad_cron" {
  command = plan

  variables {
    schedules = [{ name = "x", recurrence = "0 0 * *", max_size = 0 }]
  }

  expect_failures = [var.schedules]
}

run "schedule_that_sets_nothing" {
  command = plan

  variables {
    schedules = [{ name = "x", recurrence = "0 0 * * 6" }]
  }

  expect_failures = [var.schedules]
}

run "hook_heartbeat_out_of_range" {
  command = plan

  variables {
    termination_hook_heartbeat_seconds = 10
  }

  expect_failures = [var.termination_hook_heartbeat_seconds]
}

run "bad_jobs_prefix" {
  command = plan

  variables {
    jobs_prefix = "jobs/nested"
  }

  expect_failures = [var.jobs_prefix]
}

run "instances_run_the_agent_with_the_jobs_environment" {
  command = plan

  # The queue URL and the bucket name in the user data are known only after apply otherwise.
  override_resource {
    target          = aws_sqs_queue.jobs
    override_during = plan
    values = {
      url = "https://sqs.us-east-1.amazonaws.com/123456789012/mamba-training-dev-training-jobs"
      arn = "arn:aws:sqs:us-east-1:123456789012:mamba-training-dev-training-jobs"
    }
  }

  override_resource {
    target          = aws_s3_bucket.checkpoints
    override_during = plan
    values = {
      id  = "mamba-training-dev-ckpt-test"
      arn = "arn:aws:s3:::mamba-training-dev-ckpt-test"
    }
  }

  assert {
    condition     = strcontains(base64decode(aws_launch_template.training.user_data), "ExecStart=/opt/mamba-training/venv/bin/mamba-training agent")
    error_message = "The service must run the job agent."
  }

  assert {
    condition     = alltrue([for key in ["MAMBA_QUEUE_URL=", "MAMBA_JOBS_STORE=s3://", "MAMBA_ASG_NAME=mamba-training-dev-training-asg"] : strcontains(base64decode(aws_launch_template.training.user_data), key)])
    error_message = "Every instance's environment file must name the queue, the jobs store and the group."
  }

  assert {
    condition     = strcontains(base64decode(aws_launch_template.training.user_data), ".mamba-baked")
    error_message = "The user data must detect a baked image."
  }

  assert {
    condition     = aws_cloudwatch_metric_alarm.queue_backlog.comparison_operator == "GreaterThanOrEqualToThreshold" && aws_cloudwatch_metric_alarm.queue_backlog.threshold == 1
    error_message = "A step alarm on queue depth is the backup scale-out."
  }
}

run "multi_node_run_plans" {
  command = plan

  variables {
    instance_types    = ["g5.12xlarge", "g6.12xlarge"]
    max_instances     = 4
    min_nodes_per_run = 2
    max_nodes_per_run = 4
  }

  assert {
    condition     = local.nnodes == "2:4" && local.gpus_per_node == 4
    error_message = "Nodes get --nnodes MIN:MAX from the run's node range and one trainer per GPU."
  }

  assert {
    condition     = aws_autoscaling_group.coordinator.min_size == 1 && aws_autoscaling_group.coordinator.max_size == 1
    error_message = "The coordinator runs in an auto scaling group of exactly 1."
  }

  assert {
    condition     = aws_launch_template.coordinator.instance_type == "t3.medium"
    error_message = "The coordinator is a small on-demand instance (no spot options in its template)."
  }

  assert {
    condition     = aws_vpc_security_group_ingress_rule.coordinator_from_training.from_port == 29400
    error_message = "Training instances reach the coordinator on its port."
  }
}

run "nodes_max_below_min" {
  command = plan

  variables {
    max_instances     = 4
    min_nodes_per_run = 3
    max_nodes_per_run = 2
  }

  expect_failures = [var.max_nodes_per_run]
}

run "nodes_beyond_the_fleet" {
  command = plan

  variables {
    max_instances     = 2
    max_nodes_per_run = 3
  }

  expect_failures = [var.max_nodes_per_run]
}

run "mixed_gpu_counts" {
  command = plan

  variables {
    instance_types = ["g5.xlarge", "g5.12xlarge"]
  }

  expect_failures = [var.instance_types]
}

run "gpu_count_unknown" {
  command = plan

  variables {
    instance_types = ["g7.xlarge"]
  }

  expect_failures = [var.instance_types]
}
