################################################################################
# Logs and the training dashboard
################################################################################

resource "aws_cloudwatch_log_group" "training" {
  #checkov:skip=CKV_AWS_158:Training logs hold no secrets; CloudWatch Logs encrypts at rest with its own key.
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (30 by default): training logs lose their use long before a year.
  name              = local.log_group_name
  retention_in_days = var.log_retention_days
}

locals {
  # SEARCH finds every Run of this project and environment, so the dashboard needs no run names.
  metric_search = "{${var.metrics_namespace},Project,Environment,Run} Project=\"${var.project}\" Environment=\"${var.environment}\""

  training_widgets = [
    { metric = "Loss", title = "Training loss", stat = "Average" },
    { metric = "ValLoss", title = "Validation loss", stat = "Average" },
    { metric = "TokensPerSecond", title = "Tokens per second", stat = "Average" },
    { metric = "Step", title = "Step", stat = "Maximum" },
    { metric = "CheckpointSeconds", title = "Checkpoint seconds", stat = "Maximum" },
    { metric = "Interruptions", title = "Interruptions", stat = "Sum" },
    { metric = "CostUSD", title = "Cost so far (USD)", stat = "Maximum" },
  ]

  dashboard_widgets = concat(
    [
      for i, w in local.training_widgets : {
        type   = "metric"
        x      = (i % 2) * 12
        y      = floor(i / 2) * 6
        width  = 12
        height = 6
        properties = {
          title   = w.title
          region  = var.region
          view    = "timeSeries"
          stacked = false
          period  = 60
          metrics = [
            [{ expression = "SEARCH('${local.metric_search} MetricName=\"${w.metric}\"', '${w.stat}', 60)", id = "e1", label = "" }],
          ]
        }
      }
    ],
    [
      {
        type   = "metric"
        x      = 12
        y      = 18
        width  = 12
        height = 6
        properties = {
          title  = "Fleet: GPU utilization and instances"
          region = var.region
          view   = "timeSeries"
          period = 60
          metrics = [
            [{ expression = "SEARCH('{CWAgent,AutoScalingGroupName} AutoScalingGroupName=\"${local.asg_name}\" MetricName=\"nvidia_smi_utilization_gpu\"', 'Average', 60)", id = "gpu", label = "" }],
            ["AWS/AutoScaling", "GroupInServiceInstances", "AutoScalingGroupName", local.asg_name, { stat = "Maximum", yAxis = "right" }],
          ]
        }
      },
      {
        type   = "log"
        x      = 0
        y      = 24
        width  = 24
        height = 6
        properties = {
          title  = "Training log (latest)"
          region = var.region
          view   = "table"
          query  = "SOURCE '${aws_cloudwatch_log_group.training.name}' | fields @timestamp, @logStream, @message | sort @timestamp desc | limit 50"
        }
      },
    ],
  )
}

resource "aws_cloudwatch_dashboard" "training" {
  dashboard_name = "${local.name}-training"
  dashboard_body = jsonencode({ widgets = local.dashboard_widgets })
}

# Backup scale-out from zero on queue depth (the reconciler is the primary path: a
# backlog-per-instance metric has no data point at zero instances, plain depth does).
resource "aws_cloudwatch_metric_alarm" "queue_backlog" {
  alarm_name          = "${local.name}-queue-backlog"
  alarm_description   = "Jobs wait in ${aws_sqs_queue.jobs.name}: add a training instance."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.jobs.name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 2
  threshold           = var.queue_scale_out_messages
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_autoscaling_policy.queue_backlog.arn]
}
