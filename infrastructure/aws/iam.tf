################################################################################
# Instance role: only this stack's bucket prefix, log group, metrics namespace and queue
################################################################################

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "instance" {
  name_prefix        = "${local.name}-instance-"
  description        = "Training instances of ${local.name}"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_instance_profile" "instance" {
  name_prefix = "${local.name}-instance-"
  role        = aws_iam_role.instance.name
}

data "aws_iam_policy_document" "instance" {
  #checkov:skip=CKV_AWS_111:The only unconstrained writes are PutMetricData (namespace condition), Session Manager channels and SSM instance info, which have no resource-level permissions.
  #checkov:skip=CKV_AWS_356:"*" appears only for actions without resource-level permissions (PutMetricData, ec2:Describe*, autoscaling:Describe*, Session Manager).
  statement {
    sid       = "ListRunPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.checkpoints.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.run_prefix}/*", var.run_prefix]
    }
  }

  statement {
    sid       = "BucketLocation"
    actions   = ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.checkpoints.arn]
  }

  statement {
    sid = "ReadWriteRunPrefix"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.checkpoints.arn}/${var.run_prefix}/*"]
  }

  statement {
    sid = "OwnLogGroup"
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = [
      aws_cloudwatch_log_group.training.arn,
      "${aws_cloudwatch_log_group.training.arn}:log-stream:*",
    ]
  }

  # PutMetricData has no resource-level permissions; the namespace condition is the boundary.
  statement {
    sid       = "PutOwnMetrics"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [var.metrics_namespace, "CWAgent"]
    }
  }

  # What the CloudWatch agent asks about the instance it runs on (no resource-level permissions).
  statement {
    sid = "AgentDescribe"
    actions = [
      "ec2:DescribeTags",
      "ec2:DescribeInstances",
      "ec2:DescribeVolumes",
    ]
    resources = ["*"]
  }

  # Session Manager: the minimal set from the Session Manager guide (instead of the broader
  # AmazonSSMManagedInstanceCore, which also grants parameters, documents and patching).
  statement {
    sid = "SessionManager"
    actions = [
      "ssm:UpdateInstanceInformation",
      "ssmmessages:CreateControlChannel",
      "ssmmessages:CreateDataChannel",
      "ssmmessages:OpenControlChannel",
      "ssmmessages:OpenDataChannel",
      "ec2messages:AcknowledgeMessage",
      "ec2messages:DeleteMessage",
      "ec2messages:FailMessage",
      "ec2messages:GetEndpoint",
      "ec2messages:GetMessages",
      "ec2messages:SendReply",
    ]
    resources = ["*"]
  }

  statement {
    sid = "OwnJobQueue"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
      "sqs:SendMessage",
    ]
    resources = [aws_sqs_queue.jobs.arn]
  }

  # The jobs store: specs, states, leases, logs, and the runs of jobs (docs/jobs.md).
  statement {
    sid       = "ListJobsPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.checkpoints.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.jobs_prefix}/*", var.jobs_prefix]
    }
  }

  statement {
    sid = "ReadWriteJobsPrefix"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.checkpoints.arn}/${var.jobs_prefix}/*"]
  }

  # The agent: protection while busy, leaving when idle, completing the termination hook; the
  # reconciler timer: desired capacity. Only on this stack's group.
  statement {
    sid = "OwnGroupCapacity"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:SetInstanceProtection",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
      "autoscaling:CompleteLifecycleAction",
      "autoscaling:RecordLifecycleActionHeartbeat",
    ]
    resources = [aws_autoscaling_group.training.arn]
  }

  # Describe calls have no resource-level permissions.
  statement {
    sid = "DescribeGroups"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLifecycleHooks",
      "autoscaling:DescribeScheduledActions",
    ]
    resources = ["*"]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]

    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "instance" {
  name   = "${local.name}-training"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.instance.json
}
