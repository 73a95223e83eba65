# Production: up to 8 spot GPUs across several types, 2 running.
# The seed listed p3.2xlarge too; current Deep Learning AMIs do not support P3 (the stack refuses it
# unless ami_id names your own AMI), so g5.2xlarge takes its place.
environment       = "prod"
region            = "us-west-2"
instance_types    = ["g4dn.2xlarge", "g4dn.4xlarge", "g5.2xlarge"]
max_spot_price    = 1.00
max_instances     = 8
desired_instances = 2

log_retention_days   = 90
force_destroy_bucket = false
enable_flow_logs     = true
run_name             = "prod"

training_config = {
  model = {
    d_model = 768
    n_layer = 24
  }
  train = {
    max_steps  = 100000
    batch_size = 64
    seq_len    = 1024
  }
  checkpoint = {
    every_steps   = 1000
    every_minutes = 15
    keep_last     = 3
  }
}

# Time-based limits (docs/jobs.md): e.g. no GPUs at weekends. Fields left out stay as they are (-1).
# schedules = [
#   { name = "weekend-off", recurrence = "0 0 * * 6", min_size = 0, max_size = 0, desired_capacity = 0 },
#   { name = "weekday-on", recurrence = "0 6 * * 1", max_size = 8 },
# ]
