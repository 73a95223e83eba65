################################################################################
# Job queue with a dead-letter queue
################################################################################

resource "aws_sqs_queue" "jobs_dlq" {
  name                      = "${local.name}-training-jobs-dlq"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = var.kms_key_arn == null
  kms_master_key_id         = var.kms_key_arn
}

resource "aws_sqs_queue" "jobs" {
  name                       = "${local.name}-training-jobs"
  visibility_timeout_seconds = var.queue_visibility_timeout_seconds
  message_retention_seconds  = 1209600
  receive_wait_time_seconds  = 20
  sqs_managed_sse_enabled    = var.kms_key_arn == null
  kms_master_key_id          = var.kms_key_arn
}

# Its own resource, not the queue's redrive_policy argument: the AWS provider waits about 25 s
# after creating each queue (six matching reads of its attributes, 5 s apart), so a job queue that
# named its dead-letter queue's ARN would be created only after that one, and the launch template
# and the group (which need the job queue's URL) another 25 s later. This way both queues are
# created at once and the policy follows; a job received in between is retried as usual, it only
# cannot be dead-lettered yet.
resource "aws_sqs_queue_redrive_policy" "jobs" {
  queue_url = aws_sqs_queue.jobs.id

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.jobs_dlq.arn
    maxReceiveCount     = var.queue_max_receive_count
  })
}
