output "bucket_name" {
  description = "Checkpoint bucket."
  value       = aws_s3_bucket.checkpoints.id
}

output "bucket_arn" {
  description = "ARN of the checkpoint bucket."
  value       = aws_s3_bucket.checkpoints.arn
}

output "run_store" {
  description = "Store URL of the configured run (checkpoint.store; pass it to `mamba-training checkpoints list`)."
  value       = local.run_store
}

output "autoscaling_group_name" {
  description = "Auto scaling group of the training fleet (`mamba-training scale N` changes its desired capacity)."
  value       = aws_autoscaling_group.training.name
}

output "launch_template_id" {
  description = "Launch template of the training instances."
  value       = aws_launch_template.training.id
}

output "ami_id" {
  description = "AMI the instances boot."
  value       = local.ami_id
}

output "security_group_id" {
  description = "Security group of the instances."
  value       = aws_security_group.instances.id
}

output "instance_role_name" {
  description = "IAM role of the instances."
  value       = aws_iam_role.instance.name
}

output "instance_profile_name" {
  description = "Instance profile of the instances."
  value       = aws_iam_instance_profile.instance.name
}

output "log_group_name" {
  description = "CloudWatch log group of the training and setup logs."
  value       = aws_cloudwatch_log_group.training.name
}

output "dashboard_name" {
  description = "CloudWatch dashboard of the training metrics."
  value       = aws_cloudwatch_dashboard.training.dashboard_name
}

output "job_queue_url" {
  description = "URL of the SQS job queue."
  value       = aws_sqs_queue.jobs.id
}

output "job_dead_letter_queue_url" {
  description = "URL of the job queue's dead-letter queue."
  value       = aws_sqs_queue.jobs_dlq.id
}

output "region" {
  description = "Region of the stack."
  value       = var.region
}

output "coordinator_endpoint" {
  description = "HOST:PORT of the rendezvous coordinator (launch --coordinator); a fixed private address."
  value       = local.coordinator_endpoint
}

output "coordinator_autoscaling_group_name" {
  description = "Auto scaling group (of 1, on demand) of the rendezvous coordinator."
  value       = aws_autoscaling_group.coordinator.name
}
