# Development: one small spot GPU, scaled to zero until you ask for it (`mamba-training scale 1`).
environment       = "dev"
region            = "us-west-2"
instance_types    = ["g4dn.xlarge"]
max_spot_price    = 0.30
max_instances     = 1
desired_instances = 0

log_retention_days   = 14
force_destroy_bucket = true
run_name             = "dev"

training_config = {
  train = {
    max_steps = 2000
  }
  checkpoint = {
    every_steps   = 200
    every_minutes = 10
  }
}
