################################################################################
# General
################################################################################

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-west-2"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "The region must look like us-west-2."
  }
}

variable "project" {
  description = "Project name; prefixes every resource name and is the Project tag (the CLI's --project)."
  type        = string
  default     = "mamba-training"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,27}[a-z0-9]$", var.project))
    error_message = "The project must be 3-29 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "environment" {
  description = "Environment name (dev, staging, prod, ...); the Environment tag (the CLI's --env)."
  type        = string
  default     = "dev"

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,11}$", var.environment))
    error_message = "The environment must be 2-12 lowercase letters or digits, starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags for every resource (merged over Project, Environment and ManagedBy)."
  type        = map(string)
  default     = {}
}

################################################################################
# Fleet
################################################################################

variable "instance_types" {
  description = "GPU instance types in order of preference (first = launch template default)."
  type        = list(string)
  default     = ["g4dn.xlarge"]

  validation {
    condition     = length(var.instance_types) > 0
    error_message = "The instance_types list must name at least one instance type."
  }

  validation {
    condition     = alltrue([for t in var.instance_types : can(regex("^[a-z][a-z0-9-]*\\.([0-9]*(nano|micro|small|medium|large|xlarge)|metal(-[0-9]+xl)?)$", t))])
    error_message = "Every entry of instance_types must be an EC2 instance type such as g5.xlarge or p4d.24xlarge."
  }

  validation {
    condition     = alltrue([for t in var.instance_types : contains(keys(local.gpus_per_instance_type), t)])
    error_message = "Every entry of instance_types must be a GPU type listed in local.gpus_per_instance_type (locals.tf), so that the stack can check that a run's nodes have the same GPU count; add a new type there."
  }

  validation {
    condition     = length(distinct([for t in var.instance_types : lookup(local.gpus_per_instance_type, t, 0)])) <= 1
    error_message = "The instance_types of one run must have the same GPU count (torchrun needs the same processes per node): see local.gpus_per_instance_type in locals.tf."
  }

  validation {
    condition     = length(distinct(var.instance_types)) == length(var.instance_types)
    error_message = "The instance_types list must not repeat a type."
  }
}

variable "max_spot_price" {
  description = "Highest spot price per instance-hour in USD; null pays up to the on-demand price."
  type        = number
  default     = null

  validation {
    condition     = var.max_spot_price == null ? true : var.max_spot_price > 0
    error_message = "The max_spot_price must be a positive number of USD per hour (or null for the on-demand price)."
  }
}

variable "on_demand_base_capacity" {
  description = "Instances that are always on-demand before spot is used."
  type        = number
  default     = 0

  validation {
    condition     = var.on_demand_base_capacity >= 0 && floor(var.on_demand_base_capacity) == var.on_demand_base_capacity
    error_message = "The on_demand_base_capacity must be a whole number >= 0."
  }
}

variable "on_demand_percentage_above_base" {
  description = "Percentage of on-demand instances above the base capacity (0 = all spot)."
  type        = number
  default     = 0

  validation {
    condition     = var.on_demand_percentage_above_base >= 0 && var.on_demand_percentage_above_base <= 100
    error_message = "The on_demand_percentage_above_base must be between 0 and 100."
  }
}

variable "spot_allocation_strategy" {
  description = "How the group picks spot pools."
  type        = string
  default     = "price-capacity-optimized"

  validation {
    condition     = contains(["price-capacity-optimized", "capacity-optimized", "capacity-optimized-prioritized", "lowest-price"], var.spot_allocation_strategy)
    error_message = "The spot_allocation_strategy must be price-capacity-optimized, capacity-optimized, capacity-optimized-prioritized or lowest-price."
  }
}

variable "min_instances" {
  description = "Minimum size of the auto scaling group."
  type        = number
  default     = 0

  validation {
    condition     = var.min_instances >= 0 && floor(var.min_instances) == var.min_instances
    error_message = "The min_instances must be a whole number >= 0."
  }
}

variable "max_instances" {
  description = "Maximum size of the auto scaling group."
  type        = number
  default     = 1

  validation {
    condition     = var.max_instances >= 1 && floor(var.max_instances) == var.max_instances
    error_message = "The max_instances must be a whole number >= 1."
  }
}

variable "desired_instances" {
  description = "Instances to run now; 0 scales the fleet to zero (checkpoints stay in S3)."
  type        = number
  default     = 0

  validation {
    condition     = var.desired_instances >= 0 && floor(var.desired_instances) == var.desired_instances
    error_message = "The desired_instances must be a whole number >= 0."
  }
}

################################################################################
# Multi-node runs
################################################################################

variable "min_nodes_per_run" {
  description = "Fewest instances a run trains on (launch --nnodes MIN:MAX); with fewer it waits for more."
  type        = number
  default     = 1

  validation {
    condition     = var.min_nodes_per_run >= 1 && floor(var.min_nodes_per_run) == var.min_nodes_per_run
    error_message = "The min_nodes_per_run must be a whole number >= 1."
  }
}

variable "max_nodes_per_run" {
  description = "Most instances a run trains on; one instance is --nnodes 1:1."
  type        = number
  default     = 1

  validation {
    condition     = floor(var.max_nodes_per_run) == var.max_nodes_per_run && var.max_nodes_per_run >= var.min_nodes_per_run
    error_message = "The max_nodes_per_run must be a whole number >= min_nodes_per_run."
  }

  validation {
    condition     = var.max_nodes_per_run <= var.max_instances
    error_message = "The max_nodes_per_run must not exceed max_instances (the fleet could never reach it)."
  }
}

variable "coordinator_instance_type" {
  description = "On-demand instance type of the rendezvous coordinator (it serves a small TCP store)."
  type        = string
  default     = "t3.medium"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[0-9]*(nano|micro|small|medium|large|xlarge)$", var.coordinator_instance_type))
    error_message = "The coordinator_instance_type must be an EC2 instance type such as t3.medium."
  }
}

variable "coordinator_port" {
  description = "TCP port of the rendezvous store on the coordinator (launch --coordinator HOST:PORT)."
  type        = number
  default     = 29400

  validation {
    condition     = var.coordinator_port >= 1024 && var.coordinator_port <= 65535 && floor(var.coordinator_port) == var.coordinator_port
    error_message = "The coordinator_port must be a whole number between 1024 and 65535."
  }
}

################################################################################
# Instances
################################################################################

variable "ami_id" {
  description = "AMI for the instances (a custom AMI); null resolves the Deep Learning AMI from its public SSM parameter."
  type        = string
  default     = null

  validation {
    condition     = var.ami_id == null ? true : can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "The ami_id must look like ami-0123456789abcdef0."
  }
}

variable "dlami_type" {
  description = "Deep Learning AMI type in /aws/service/deeplearning/ami/x86_64/<type>/latest/ami-id (used when ami_id is null)."
  type        = string
  default     = "base-oss-nvidia-driver-gpu-ubuntu-22.04"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]+$", var.dlami_type))
    error_message = "The dlami_type must be an AMI type name such as base-oss-nvidia-driver-gpu-ubuntu-22.04."
  }
}

variable "ami_ssm_parameter_name" {
  description = "SSM parameter holding the AMI id (e.g. your own golden-image pipeline's); null uses the Deep Learning AMI parameter for dlami_type."
  type        = string
  default     = null

  validation {
    condition     = var.ami_ssm_parameter_name == null ? true : startswith(var.ami_ssm_parameter_name, "/")
    error_message = "The ami_ssm_parameter_name must be a parameter path starting with '/'."
  }
}

variable "key_pair_name" {
  description = "EC2 key pair for SSH; null for none (use Session Manager)."
  type        = string
  default     = null
}

variable "root_volume_size" {
  description = "Root volume size in GiB (the AMI needs ~100; the checkpoint cache and pip wheels need more)."
  type        = number
  default     = 200

  validation {
    condition     = var.root_volume_size >= 100 && var.root_volume_size <= 16384
    error_message = "The root_volume_size must be between 100 and 16384 GiB."
  }
}

variable "imds_hop_limit" {
  description = "IMDSv2 response hop limit; 2 lets containers on the instance reach the metadata service."
  type        = number
  default     = 2

  validation {
    condition     = var.imds_hop_limit >= 1 && var.imds_hop_limit <= 64
    error_message = "The imds_hop_limit must be between 1 and 64."
  }
}

variable "associate_public_ip_address" {
  description = "Give instances a public IP (needed in a default VPC without NAT to reach PyPI, GitHub and AWS APIs)."
  type        = bool
  default     = true
}

################################################################################
# Network
################################################################################

variable "vpc_id" {
  description = "VPC for the instances; null uses the region's default VPC."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Subnets for the auto scaling group; empty uses every subnet of the VPC (more spot pools)."
  type        = list(string)
  default     = []
}

variable "allowed_ssh_cidrs" {
  description = "CIDR blocks allowed to reach SSH (22/tcp). Empty: no inbound rule at all."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.allowed_ssh_cidrs : can(cidrhost(c, 0))])
    error_message = "Every entry of allowed_ssh_cidrs must be a CIDR block such as 203.0.113.0/24."
  }
}

variable "allow_public_ssh" {
  description = "Explicit opt-in to accept 0.0.0.0/0 (or ::/0) in allowed_ssh_cidrs."
  type        = bool
  default     = false
}

variable "enable_flow_logs" {
  description = "Record VPC flow logs of the VPC to CloudWatch Logs."
  type        = bool
  default     = false
}

################################################################################
# Storage, logs, queue
################################################################################

variable "kms_key_arn" {
  description = "KMS key for the bucket and the EBS volumes; null uses SSE-S3 and the EBS default key."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null ? true : can(regex("^arn:aws[a-z-]*:kms:", var.kms_key_arn))
    error_message = "The kms_key_arn must be a KMS key ARN."
  }
}

variable "force_destroy_bucket" {
  description = "Let `terraform destroy` delete the checkpoint bucket with its checkpoints (dev only)."
  type        = bool
  default     = false
}

variable "noncurrent_version_expiration_days" {
  description = "Days a deleted or overwritten bucket object (a checkpoint pruned by checkpoint.keep_last, a replaced latest.json) stays as a billed, recoverable noncurrent version before S3 removes it. Raise it for a longer undo window."
  type        = number
  default     = 1

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && var.noncurrent_version_expiration_days <= 3650 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "The noncurrent_version_expiration_days must be a whole number of days from 1 to 3650."
  }
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which incomplete multipart uploads (interrupted checkpoint uploads) are removed."
  type        = number
  default     = 3

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1
    error_message = "The abort_incomplete_multipart_days must be at least 1."
  }
}

variable "log_retention_days" {
  description = "Retention of the training log group in days."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "The log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, ...)."
  }
}

variable "queue_visibility_timeout_seconds" {
  description = "Visibility timeout of the job queue (how long a received job is hidden from others)."
  type        = number
  default     = 3600

  validation {
    condition     = var.queue_visibility_timeout_seconds >= 0 && var.queue_visibility_timeout_seconds <= 43200
    error_message = "The queue_visibility_timeout_seconds must be between 0 and 43200."
  }
}

variable "queue_max_receive_count" {
  description = "Receives before a job moves to the dead-letter queue."
  type        = number
  default     = 5

  validation {
    condition     = var.queue_max_receive_count >= 1
    error_message = "The queue_max_receive_count must be at least 1."
  }
}

################################################################################
# Training job
################################################################################

variable "package_source" {
  description = "pip requirement for the trainer, e.g. \"mamba-training==0.1.0\"; null installs git+<package_repository>@<package_ref>."
  type        = string
  default     = null

  validation {
    condition     = var.package_source == null ? true : length(trimspace(var.package_source)) > 0 && !can(regex("[\\s'\"`$;&|<>]", var.package_source))
    error_message = "The package_source must be one pip requirement without spaces or shell characters."
  }
}

variable "package_repository" {
  description = "Git repository of the trainer (used when package_source is null)."
  type        = string
  default     = "https://github.com/mamba-training/mamba-training"

  validation {
    condition     = can(regex("^https://[^\\s'\"`$;&|<>]+$", var.package_repository))
    error_message = "The package_repository must be an https:// URL."
  }
}

variable "package_ref" {
  description = "Git tag, branch or commit of package_repository to install (pin a tag or commit)."
  type        = string
  default     = "v0.1.0"

  validation {
    condition     = can(regex("^[A-Za-z0-9._/-]+$", var.package_ref))
    error_message = "The package_ref must be a git ref (letters, digits, . _ / -)."
  }
}

variable "torch_version" {
  description = "torch version installed before the package (the CUDA wheel from PyPI)."
  type        = string
  default     = "2.13.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.torch_version))
    error_message = "The torch_version must be a version such as 2.13.0."
  }
}

variable "run_name" {
  description = "Name of the training run; its checkpoints live at s3://<bucket>/<run_prefix>/<run_name>."
  type        = string
  default     = "default"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", var.run_name))
    error_message = "The run_name must be 1-64 letters, digits, '.', '_' or '-'."
  }
}

variable "run_prefix" {
  description = "Key prefix in the bucket under which runs live (the instance role may only touch this prefix)."
  type        = string
  default     = "runs"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", var.run_prefix))
    error_message = "The run_prefix must be 1-64 letters, digits, '.', '_' or '-' (no slashes)."
  }
}

variable "training_config" {
  description = "Run config sections (model, data, train, checkpoint, ...) as an object; the stack adds checkpoint.store, spot and aws settings."
  type        = any
  default     = {}
}

variable "checkpoint_grace_seconds" {
  description = "Seconds the trainer may spend on the emergency checkpoint after a spot notice or SIGTERM."
  type        = number
  default     = 90

  validation {
    condition     = var.checkpoint_grace_seconds >= 10 && var.checkpoint_grace_seconds <= 110
    error_message = "The checkpoint_grace_seconds must be between 10 and 110 (a spot notice gives 120 s)."
  }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of the trainer's metrics (config aws.metrics_namespace)."
  type        = string
  default     = "MambaTraining"

  validation {
    condition     = can(regex("^[A-Za-z0-9._/#:-]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/")
    error_message = "The metrics_namespace must be a custom CloudWatch namespace (not AWS/...)."
  }
}

variable "deny_insecure_transport" {
  description = "Deny checkpoint-bucket requests not made over TLS (aws:SecureTransport). Keep true on AWS; deploy.sh --endpoint sets false for a local endpoint served over plain HTTP."
  type        = bool
  default     = true
  nullable    = false
}

################################################################################
# Jobs: the queue-driven fleet (docs/jobs.md)
################################################################################

variable "jobs_prefix" {
  description = "Key prefix of the jobs store in the checkpoint bucket (MAMBA_JOBS_STORE = s3://<bucket>/<jobs_prefix>)."
  type        = string
  default     = "jobs"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*$", var.jobs_prefix))
    error_message = "The jobs_prefix must be one path segment of letters, digits, '.', '_' or '-'."
  }
}

variable "agent_idle_seconds" {
  description = "How long an agent waits without a job before it drops scale-in protection and terminates its instance (decrementing desired capacity)."
  type        = number
  default     = 600

  validation {
    condition     = var.agent_idle_seconds >= 0
    error_message = "The agent_idle_seconds must be >= 0."
  }
}

variable "agent_lease_seconds" {
  description = "A job's lease in the jobs store, renewed every third of it while the job runs; a holder silent this long loses the job."
  type        = number
  default     = 300

  validation {
    condition     = var.agent_lease_seconds >= 30 && var.agent_lease_seconds <= 3600
    error_message = "The agent_lease_seconds must be between 30 and 3600."
  }
}

variable "reconcile_interval_seconds" {
  description = "How often the reconciler (a systemd timer on every training instance) sets desired capacity from the jobs store."
  type        = number
  default     = 60

  validation {
    condition     = var.reconcile_interval_seconds >= 10
    error_message = "The reconcile_interval_seconds must be at least 10."
  }
}

variable "queue_scale_out_messages" {
  description = "Backup scale-out: visible messages in the job queue (for 2 minutes) that add one instance. The reconciler is the primary path."
  type        = number
  default     = 1

  validation {
    condition     = var.queue_scale_out_messages >= 1
    error_message = "The queue_scale_out_messages must be at least 1."
  }
}

variable "termination_hook_heartbeat_seconds" {
  description = "Lifecycle hook on termination: how long an instance may take to checkpoint and complete the action (30-7200)."
  type        = number
  default     = 300

  validation {
    condition     = var.termination_hook_heartbeat_seconds >= 30 && var.termination_hook_heartbeat_seconds <= 7200
    error_message = "The termination_hook_heartbeat_seconds must be between 30 and 7200 (the range AWS accepts)."
  }
}

variable "schedules" {
  description = "Time-based capacity limits (aws_autoscaling_schedule). Fields left at -1 are not changed; e.g. no GPUs at weekends: [{ name = \"weekend-off\", recurrence = \"0 0 * * 6\", min_size = 0, max_size = 0, desired_capacity = 0 }, { name = \"weekday-on\", recurrence = \"0 6 * * 1\", max_size = 4 }]."
  type = list(object({
    name             = string
    recurrence       = string
    min_size         = optional(number, -1)
    max_size         = optional(number, -1)
    desired_capacity = optional(number, -1)
    time_zone        = optional(string, "Etc/UTC")
  }))
  default = []

  validation {
    condition     = alltrue([for s in var.schedules : length(split(" ", trimspace(s.recurrence))) == 5])
    error_message = "Each of the schedules needs a recurrence that is a five-field cron expression (minute hour day month weekday)."
  }

  validation {
    condition     = alltrue([for s in var.schedules : s.min_size >= -1 && s.max_size >= -1 && s.desired_capacity >= -1])
    error_message = "The schedules' sizes must be >= 0, or -1 to leave that field unchanged."
  }

  validation {
    condition     = alltrue([for s in var.schedules : s.min_size >= 0 || s.max_size >= 0 || s.desired_capacity >= 0])
    error_message = "Each of the schedules must set at least one of min_size, max_size or desired_capacity."
  }

  validation {
    condition     = length(distinct([for s in var.schedules : s.name])) == length(var.schedules)
    error_message = "The schedules' names must be unique."
  }
}
